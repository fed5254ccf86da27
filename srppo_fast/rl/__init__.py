"""The parts of an on-policy RL step, which stages/rl.py runs: run.py (RLRun: what a stage carries from step to
step, generation, one step), models.py (the models, step 3: score), rewards.py (step 4: rewards and advantages),
update.py (step 5: PPO), samples.py (what the step shows of its samples)."""
