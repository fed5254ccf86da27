"""Compile every Triton kernel variant ahead of time for a GPU architecture, without a GPU, and report
what ptxas says of each: registers per thread, spill stores/loads, shared memory.

This catches what the interpreter cannot (compiled-mode type rules, unsupported ops) and checks the
promise that a 128k-256k vocabulary never spills registers. It is a static resource report, not a
speed measurement. Must run without TRITON_INTERPRET (the script refuses otherwise).

    python benchmarks/compile_kernels.py [--arch 90] [--csv]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def variants():
    """(name, kernel, signature, constexprs, num_warps) for every variant the launchers can pick."""
    from srppo_fast.ops.gae import _coherent_gae_kernel, _gae_kernel
    from srppo_fast.ops.logprobs import _token_logprobs_bwd_kernel, _token_logprobs_fwd_kernel
    from srppo_fast.ops.ppo import _ppo_bwd_kernel, _ppo_fwd_kernel

    out = []
    for dtype in ("bf16", "fp16", "fp32"):
        for block, warps in ((8192, 16), (1024, 4)):
            for entropy in (False, True):
                sig = {"logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32",
                       "entropy_ptr": "*fp32", "stride_row": "i64", "V": "i32", "inv_temperature": "fp32",
                       "ignore_index": "i32", "BLOCK_V": "constexpr", "RETURN_ENTROPY": "constexpr"}
                out.append((f"logprobs_fwd {dtype} BLOCK_V={block} entropy={entropy}", _token_logprobs_fwd_kernel,
                            sig, {"BLOCK_V": block, "RETURN_ENTROPY": entropy}, warps))
                sig = {"logits_ptr": f"*{dtype}", "grad_logits_ptr": f"*{dtype}", "labels_ptr": "*i64",
                       "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "grad_logp_ptr": "*fp32",
                       "grad_entropy_ptr": "*fp32", "stride_row": "i64", "stride_grad_row": "i64", "V": "i32",
                       "inv_temperature": "fp32", "ignore_index": "i32", "BLOCK_V": "constexpr",
                       "HAS_GRAD_LOGP": "constexpr", "HAS_GRAD_ENTROPY": "constexpr"}
                out.append((f"logprobs_bwd {dtype} BLOCK_V={block} entropy={entropy}", _token_logprobs_bwd_kernel,
                            sig, {"BLOCK_V": block, "HAS_GRAD_LOGP": True, "HAS_GRAD_ENTROPY": entropy}, warps))
    for packed in (False, True):
        for has_mask in (False, True):
            sig = {"rewards_ptr": "*fp32", "values_ptr": "*fp32", "mask_ptr": "*u8", "cu_ptr": "*i32",
                   "adv_ptr": "*fp32", "ret_ptr": "*fp32", "stride_row": "i64", "T": "i32", "gamma": "fp32",
                   "lam": "fp32", "BLOCK_T": "constexpr", "PACKED": "constexpr", "HAS_MASK": "constexpr"}
            out.append((f"gae packed={packed} mask={has_mask}", _gae_kernel, sig,
                        {"BLOCK_T": 1024, "PACKED": packed, "HAS_MASK": has_mask}, 4))
    for token in (False, True):
        for values in (False, True):
            for kl in (1, 2, 3):
                sig = {name: "*fp32" for name in ("old_ptr", "ref_ptr", "sft_ptr", "pt_ptr", "values_ptr",
                                                  "seq_scale_ptr", "seq_shift_ptr", "rewards_ptr", "adv_ptr",
                                                  "ret_ptr", "final_ptr", "raw_ptr")}
                sig.update({"mask_ptr": "*u8", "cu_ptr": "*i32", "stride_row": "i64", "T": "i32"})
                sig.update({name: "fp32" for name in ("kl_coef", "scale", "token_clip", "seq_clip", "gamma", "lam")})
                meta = {"BLOCK_T": 1024, "PACKED": False, "HAS_MASK": True, "HAS_VALUES": values,
                        "HAS_SEQ_AFFINE": True, "TOKEN_LEVEL": token, "LENGTH_NORMALIZE": True, "KL_CODE": kl}
                sig.update({name: "constexpr" for name in meta})
                order = list(_coherent_gae_kernel.arg_names)
                out.append((f"coherent_gae token={token} values={values} k{kl}", _coherent_gae_kernel,
                            {k: sig[k] for k in order}, meta, 4))
    for values in (False, True):
        for kl in (1, 3):
            meta = {"BLOCK": 1024, "HAS_POLICY": True, "HAS_ENTROPY": True, "HAS_KL": True, "KL_CODE": kl,
                    "HAS_VALUES": values}
            sig = {name: "*fp32" for name in ("logp_ptr", "old_ptr", "adv_ptr", "entropy_ptr", "ref_ptr",
                                              "values_ptr", "old_values_ptr", "returns_ptr", "stats_ptr")}
            sig.update({"mask_ptr": "*u8", "N": "i32"})
            sig.update({name: "fp32" for name in ("clip_low", "clip_high", "value_clip", "inv_norm")})
            sig.update({name: "constexpr" for name in meta})
            out.append((f"ppo_fwd values={values} k{kl}", _ppo_fwd_kernel,
                        {k: sig[k] for k in _ppo_fwd_kernel.arg_names}, meta, 4))
            bsig = {name: "*fp32" for name in ("logp_ptr", "old_ptr", "adv_ptr", "ref_ptr", "values_ptr",
                                               "old_values_ptr", "returns_ptr", "grad_actor_ptr", "grad_critic_ptr",
                                               "grad_logp_ptr", "grad_entropy_ptr", "grad_values_ptr")}
            bsig.update({"mask_ptr": "*u8", "N": "i32"})
            bsig.update({name: "fp32" for name in ("clip_low", "clip_high", "value_clip", "inv_norm", "entropy_coef",
                                                   "kl_coef")})
            bsig.update({name: "constexpr" for name in meta})
            out.append((f"ppo_bwd values={values} k{kl}", _ppo_bwd_kernel,
                        {k: bsig[k] for k in _ppo_bwd_kernel.arg_names}, meta, 4))
    return out


def ptxas_report(ptx: str, arch: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(int(arch.rstrip("a"))).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, f"-arch=sm_{arch}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return {"registers": int(regs.group(1)) if regs else -1,
            "spill_stores": int(spills.group(1)) if spills else -1,
            "spill_loads": int(spills.group(2)) if spills else -1,
            "stack_frame": int(stack.group(1)) if stack else -1, "ok": proc.returncode == 0}


def compile_all(arch: int = 90) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    suffix = f"{arch}a" if arch == 90 else str(arch)
    rows = []
    for name, kernel, sig, meta, warps in variants():
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=meta), target=target,
                                  options={"num_warps": warps})
        report = ptxas_report(compiled.asm["ptx"], suffix)
        rows.append({"kernel": name, "arch": f"sm_{suffix}", "num_warps": warps,
                     "shared_bytes": compiled.metadata.shared, **report})
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--csv", action="store_true", help="write benchmarks/results/kernel_compile.csv")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_kernels.py compiles real kernels: unset TRITON_INTERPRET")
    rows = compile_all(args.arch)
    for r in rows:
        print(f"{r['kernel']:<44} {r['arch']} warps={r['num_warps']:<3} regs={r['registers']:<4} "
              f"spill={r['spill_stores']}/{r['spill_loads']} stack={r['stack_frame']} smem={r['shared_bytes']}")
    if args.csv:
        import csv

        path = Path(__file__).resolve().parent / "results" / "kernel_compile.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
