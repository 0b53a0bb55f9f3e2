#!/usr/bin/env python3
# The ptxas resource table of a build log (scripts/build_cuda_check and
# scripts/portable_wheel_check: ptxas -v's output through pip wheel -v).
# Usage: ptxas_report.py BUILD_LOG; exit 1 on any spill, stack frame or local memory.
"""ptxas -v's report as a table; exit 1 on any spill or local memory."""
import re
import subprocess
import sys

lines = open(sys.argv[1], errors="replace").read().splitlines()
entries = {}  # (mangled name, arch) -> resources, in compile order
functions = {}  # every function ptxas reports properties for (called ones too)
current = props_for = None
for line in lines:
    m = re.search(r"ptxas info\s*: Compiling entry function '([^']+)' for '(\w+)'", line)
    if m:
        current = (m.group(1), m.group(2))
        entries[current] = {}
        continue
    m = re.search(r"ptxas info\s*: Function properties for (\S+)", line)
    if m:
        props_for = m.group(1)
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                  line)
    if m and props_for is not None:
        stack, st, ld = map(int, m.groups())
        functions[props_for] = (stack, st, ld)
        if current is not None and props_for == current[0]:
            entries[current].update(stack=stack, spill_st=st, spill_ld=ld)
        props_for = None
        continue
    m = re.search(r"ptxas info\s*: Used (\d+) registers(.*)", line)
    if m and current is not None:
        rest = m.group(2)
        local = [int(x) for x in re.findall(r"(\d+) bytes (?:lmem|cumulative stack size)", rest)]
        entries[current].update(regs=int(m.group(1)), local=max(local, default=0))
if not entries:
    sys.exit("ptxas_report: no ptxas resource report in the build log "
             "(was -Xptxas=-v passed? see SAM_FAST_PTXAS_VERBOSE in setup.py)")

names = [name for name, _ in entries]
demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                           text=True).stdout.splitlines()
if len(demangled) != len(names):
    demangled = names


def short(name: str) -> str:
    """'void elementwise_kernel<float, 3, NoExtra, PerturbOp>(TensorListMetadata<3,
    NoExtra, false>, PerturbOp)' -> 'elementwise_kernel<float, 3, NoExtra, PerturbOp> 4K'"""
    name = re.sub(r"sam_fast::cuda::|\(anonymous namespace\)::|c10::", "", name)
    size = " 32K" if re.search(r"TensorListMetadata<[^()]*true>", name) else (
        " 4K" if "TensorListMetadata" in name else "")
    name = re.sub(r"^void ", "", name)
    depth = 0
    for i, ch in enumerate(name):  # drop the parameter list: the first '(' outside <>
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            name = name[:i]
            break
    return name + size


rows = [(short(d), arch, r) for d, ((_, arch), r) in zip(demangled, entries.items())]
width = max(len(n) for n, _, _ in rows)
head = f"{'kernel':<{width}}  arch    regs  stack  spill st  spill ld  local"
print(head)
print("-" * len(head))
bad = []
for name, arch, r in rows:
    print(f"{name:<{width}}  {arch:<6} {r.get('regs', -1):5d} {r.get('stack', -1):6d} "
          f"{r.get('spill_st', -1):9d} {r.get('spill_ld', -1):9d} {r.get('local', 0):6d}")
    if r.get("stack", 0) or r.get("spill_st", 0) or r.get("spill_ld", 0) or r.get("local", 0):
        bad.append(f"{name} ({arch})")
    if "regs" not in r or "stack" not in r:
        bad.append(f"{name} ({arch}): incomplete ptxas report")
kernels = {n for n, _ in entries}
for fname, (stack, st, ld) in functions.items():
    if (stack or st or ld) and fname not in kernels:
        bad.append(f"called function {fname}: {stack} bytes stack, {st}/{ld} spill st/ld")
print(f"{len(rows)} kernels (4K/32K: kernel parameter metadata size); bytes per thread")
if bad:
    print("ptxas_report: spills or local memory in:\n  " + "\n  ".join(bad),
          file=sys.stderr)
    sys.exit(1)
