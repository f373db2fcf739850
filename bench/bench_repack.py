"""Without AMX kernels, would another weight type make the embedded model faster? (Not adopted.)

Where llama.cpp's AMX kernels are off (a CPU without AMX, or a build whose AMX kernels crash,
which permrank then runs with ``--no-repack``), the 0.5B runs its shipped Q4_K_M weights. On x86
llama.cpp repacks Q4_0 and IQ4_NL weights for its AVX2 8x8 kernels, but not Q4_K's faster than
it reads them unpacked. This script measures that, with the AMX kernels refused the way a CPU
without them refuses them: the server is started under a seccomp filter that fails
``arch_prctl(ARCH_REQ_XCOMP_PERM)`` (ggml then prints "AMX is not ready to be used!" and keeps
its other repacked kernels). Every figure is a ratio to the shipped file without repacking,
measured in the same run.

1. ``llama-bench -p 256 -n 16 -t 2`` for: the shipped Q4_K_M without repacking (the baseline),
   the same repacked, and IQ4_NL and Q4_0 copies (``llama-quantize --allow-requantize``),
   repacked.
2. With ``--collections``: the 0.5B recipe's scoring (``likelihood-chat``, 200-token passages,
   20 slots) over BM25 top-20 with the baseline and the IQ4_NL copy, rows written as
   ``bench_real.py`` writes them (``--out``), so ``bench/fuse_check.py``-style figures follow.

Measured 2026-12-02 (this 2-core VM, nothing else running): prompt reading 207-210 tokens a
second (baseline), 202-212 repacked Q4_K_M, 290-293 Q4_0, 294-305 IQ4_NL (x1.4); decoding
unchanged (24-26). On DL20's first 19 queries: 15.1 s a query (baseline) against 11.5 (IQ4_NL,
0.76x). On all of DL20 and DL19 the IQ4_NL copy ranks a little worse: fused at 0.6, DL20 0.5404
and DL19 0.5842 against 0.5457-0.5521 and 0.5876-0.5884 for the shipped file and the Q8_0 copy.
Still above 8 s a query and below the shipped weights' quality, so not adopted
(docs/local-models.md, "Without AMX kernels").

    PYTHONPATH=. python bench/bench_repack.py
    PYTHONPATH=. python bench/bench_repack.py --collections dl20,dl19 --limit 20
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_real import run_one  # noqa: E402

from permrank.servers.llamacpp import LlamaServer, llama_server_binary  # noqa: E402
from permrank.servers.models import atomic_file, models_dir, resolve  # noqa: E402

NO_AMX = r"""
import ctypes, os, struct, sys
def op(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)
program = b"".join([
    op(0x20, 0, 0, 4),                # A = seccomp_data.arch
    op(0x15, 0, 5, 0xC000003E),       # not x86-64: allow
    op(0x20, 0, 0, 0),                # A = seccomp_data.nr
    op(0x15, 0, 3, 158),              # not arch_prctl: allow
    op(0x20, 0, 0, 16),               # A = args[0]
    op(0x15, 0, 1, 0x1023),           # not ARCH_REQ_XCOMP_PERM: allow
    op(0x06, 0, 0, 0x00050000 | 1),   # fail with EPERM
    op(0x06, 0, 0, 0x7FFF0000),       # allow
])
class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
buffer = ctypes.create_string_buffer(program, len(program))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(
    22, 2, ctypes.byref(Program(len(program) // 8, ctypes.addressof(buffer))), 0, 0
):
    sys.exit(f"seccomp filter refused (errno {ctypes.get_errno()})")
os.execv(sys.argv[1], sys.argv[1:])
"""
"""Runs a program with the AMX tile state refused (PR_SET_NO_NEW_PRIVS, then a seccomp filter)."""

SPEED = re.compile(r"\|\s*(pp256|tg16)\s*\|\s*([\d.]+)")


def without_amx(command: list[str]) -> list[str]:
    return [sys.executable, "-c", NO_AMX, *command]


class NoAmxServer(LlamaServer):
    """The embedded server with repacking on and the AMX kernels refused."""

    def command(self) -> list[str]:
        return without_amx(super().command())


def copy_of(source: Path, quant: str, tools: Path) -> Path:
    target = models_dir() / "bench" / f"{source.stem}.{quant.lower()}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as tmp:
            subprocess.run(
                [str(tools / "llama-quantize"), "--allow-requantize", str(source), str(tmp), quant],
                check=True,
                capture_output=True,
            )
    return target


def llama_bench(tools: Path, model: Path, repack: bool) -> dict[str, float]:
    command = [str(tools / "llama-bench"), "-m", str(model), "-p", "256", "-n", "16", "-t", "2"]
    command += ["-r", "2"] + ([] if repack else ["--repack", "0"])
    done = subprocess.run(without_amx(command), check=True, capture_output=True, text=True)
    return {m.group(1): float(m.group(2)) for m in SPEED.finditer(done.stdout)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--collections", default="", help="also rerank these (dl19,dl20)")
    p.add_argument("--limit", type=int, default=None, help="first N queries of each collection")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "repack")
    args = p.parse_args()
    tools = llama_server_binary().parent
    shipped, _ = resolve(args.model)
    runs = [
        ("shipped Q4_K_M, no repacking (baseline)", shipped, False),
        ("shipped Q4_K_M, repacked", shipped, True),
        ("IQ4_NL copy, repacked", copy_of(shipped, "IQ4_NL", tools), True),
        ("Q4_0 copy, repacked", copy_of(shipped, "Q4_0", tools), True),
    ]
    print("| weights (AMX refused) | prompt tok/s | x baseline | generation tok/s | x baseline |")
    print("|---|---|---|---|---|")
    base: dict[str, float] = {}
    for name, model, repack in runs:
        speed = llama_bench(tools, model, repack)
        base = base or speed
        print(
            f"| {name} | {speed['pp256']:.0f} | x{speed['pp256'] / base['pp256']:.2f} | "
            f"{speed['tg16']:.1f} | x{speed['tg16'] / base['tg16']:.2f} |",
            flush=True,
        )
    if args.collections:
        run_args = argparse.Namespace(
            depth=20,
            limit=args.limit,
            max_passage_tokens=200,
            parallel=20,
            ctx=1024,
            threads=2,
            out=args.out,
        )
        for label, model, extra in (
            ("shipped-no-repack", shipped, ["--no-repack"]),
            ("iq4_nl-repacked", runs[2][1], ["--repack"]),
        ):
            server = NoAmxServer(model, ctx=1024, parallel=20, threads=2, extra_args=extra)
            with server.start():
                for collection in args.collections.split(","):
                    run_one(
                        run_args, server, f"{args.model}-{label}", "likelihood-chat", collection
                    )
        print(f"rows in {args.out}: compare them with bench/fuse_offline.py's fused_orders")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
