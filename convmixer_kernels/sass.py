"""Reading compiled GPU code without a GPU: resource usage and the SASS instruction mix of a cubin.

The tools are the `cuobjdump` and `nvdisasm` that ship in Triton's wheel (triton/backends/nvidia/bin),
so nothing beyond the package's dependencies is needed. Works on a cubin, or on an object file / fat
binary holding several (the functions are then keyed per target, "sm_90").

    usage = resource_usage(path)         # {(arch, function): Resources(regs, stack, shared, local)}
    code = disassemble(path)             # {(arch, function): [Instr, ...]}
    mix = hot_loop_mix(code[key])        # LoopMix: opcode classes of the hottest innermost loop

The hot loop is the innermost loop (a backward branch's [target, branch] range that holds no other
loop with FMA work) with the most FMA instructions; a function without loops is one straight-line
body (a Triton program that owns one tile). Counts are static (instructions in the loop body, once
each), which is what a static estimate can say: trip counts come from the launch geometry.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from collections import Counter


def tool(name: str) -> str:
    """Path of cuobjdump/nvdisasm/ptxas: the copy in Triton's wheel, else one on PATH."""
    try:
        import triton
        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    p = shutil.which(name)
    if p is None:
        raise FileNotFoundError(f"{name} not found (neither in triton/backends/nvidia/bin nor on PATH)")
    return p


@dataclasses.dataclass
class Resources:
    regs: int
    stack: int   # bytes of stack frame per thread
    shared: int  # static shared memory per block, bytes
    local: int   # bytes of local memory (spills and local arrays) per thread


_FUNC_RE = re.compile(r"Function\s*:?\s*(\S+?):?\s*$")
_ARCH_RE = re.compile(r"arch\s*=\s*(sm_\d+)")


def _run(args) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def resource_usage(path: str, arch: str = "sm_?") -> dict:
    """{(arch, mangled function name): Resources} from `cuobjdump -res-usage`; `arch` names the target of
    a plain cubin (whose listing does not say it)."""
    out, func = {}, None
    for line in _run([tool("cuobjdump"), "-res-usage", path]).splitlines():
        m = _ARCH_RE.search(line)
        if m:
            arch = m.group(1)
        if "Function" in line:
            func = line.split("Function", 1)[1].strip().strip(":").strip()
            continue
        if func and "REG:" in line:
            f = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            out[(arch, func)] = Resources(int(f.get("REG", 0)), int(f.get("STACK", 0)), int(f.get("SHARED", 0)),
                                          int(f.get("LOCAL", 0)))
            func = None
    return out


@dataclasses.dataclass
class Instr:
    addr: int
    opcode: str      # e.g. "FFMA", "LDS.128" -> opcode "LDS", full "LDS.128"
    full: str
    operands: str


_INSTR_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def disassemble(path: str, arch: str = "sm_?") -> dict:
    """{(arch, mangled function name): [Instr]} from `cuobjdump -sass` (`arch` as in resource_usage)."""
    out, cur = {}, None
    for line in _run([tool("cuobjdump"), "-sass", path]).splitlines():
        m = _ARCH_RE.search(line)
        if m:
            arch = m.group(1)
        if "Function :" in line:
            cur = out.setdefault((arch, line.split("Function :", 1)[1].strip()), [])
            continue
        m = _INSTR_RE.search(line)
        if m and cur is not None:
            full = m.group(3)
            cur.append(Instr(int(m.group(1), 16), full.split(".")[0], full, m.group(4).strip()))
    return out


# Opcode classes of the report. FMA work: FFMA one fp32 FMA, HFMA2 two (half2/bf16x2 lanes).
CLASSES = {
    "fma": ("FFMA", "HFMA2", "DFMA"),
    "ldg": ("LDG",),
    "lds": ("LDS", "LDSM"),
    "stg": ("STG", "ST", "RED", "ATOM", "ATOMG"),
    "sts": ("STS",),
    "local": ("LDL", "STL"),
    "int": ("IMAD", "IADD3", "IADD", "ISETP", "SHF", "LEA", "LOP3", "IABS", "MOV", "SEL", "IMNMX", "LOP",
            "UIADD3", "UMOV", "ULDC", "UIMAD", "USHF", "ULEA", "ULOP3", "UISETP", "USEL", "S2R", "S2UR", "CS2R",
            "IMUL", "SGXT", "BMSK", "FLO", "POPC", "VIADD", "VIMNMX", "IDP", "PLOP3", "P2R", "R2P", "R2UR"),
    "cvt": ("F2F", "F2FP", "I2F", "F2I", "PRMT", "HADD2", "I2FP", "F2IP"),
    "fp": ("FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "MUFU", "FCHK", "HMUL2", "FSET", "DADD", "DMUL", "FRND"),
    "mma": ("HMMA", "WGMMA", "IMMA", "HGMMA"),
    "ctrl": ("BRA", "BAR", "EXIT", "BSYNC", "BSSY", "NOP", "SHFL", "RET", "CALL", "WARPSYNC", "BPT", "YIELD",
             "DEPBAR", "ELECT", "SYNCS", "MEMBAR", "ERRBAR", "CCTL", "VOTE", "VOTEU"),
}
_CLASS_OF = {op: cls for cls, ops in CLASSES.items() for op in ops}


def opcode_class(op: str) -> str:
    return _CLASS_OF.get(op, "other")


@dataclasses.dataclass
class LoopMix:
    start: int           # address range of the loop body (a function body when it has no loop)
    end: int
    is_loop: bool
    instructions: int    # static count, NOPs excluded
    fma_work: int        # FFMA + 2 * HFMA2
    classes: dict        # class -> count
    opcodes: dict        # opcode -> count

    @property
    def fma_fraction(self) -> float:
        """FMA work (HFMA2 counted as 2) over issued instructions: the share of the issue slots doing the conv."""
        return self.fma_work / max(1, self.instructions + self.classes.get("fma_hfma2_extra", 0))


def _mix(instrs, start, end, is_loop) -> LoopMix:
    body = [i for i in instrs if start <= i.addr <= end and i.opcode != "NOP"]
    ops = Counter(i.opcode for i in body)
    classes = Counter(opcode_class(i.opcode) for i in body)
    fma_work = ops.get("FFMA", 0) + 2 * ops.get("HFMA2", 0) + ops.get("DFMA", 0)
    return LoopMix(start, end, is_loop, len(body), fma_work, dict(classes), dict(ops))


def loops(instrs) -> list:
    """(start, end) address ranges of the loops: a branch to an address at or before itself."""
    out = []
    for i in instrs:
        if i.opcode == "BRA":
            m = re.search(r"0x([0-9a-f]+)", i.operands)
            if m and int(m.group(1), 16) <= i.addr:
                out.append((int(m.group(1), 16), i.addr))
    return out


def innermost_fma_loops(instrs) -> list:
    """LoopMix of every innermost loop that does FMA work, in address order."""
    mixes = [_mix(instrs, s, e, True) for s, e in loops(instrs)]
    with_fma = [m for m in mixes if m.fma_work > 0]
    return sorted([m for m in with_fma
                   if not any(o is not m and m.start <= o.start and o.end <= m.end
                              and (o.start, o.end) != (m.start, m.end) for o in with_fma)],
                  key=lambda m: m.start)


def weighted_mix(parts) -> LoopMix:
    """The mix of several loops run w times each: [(LoopMix, w), ...] -> one LoopMix of sums."""
    classes, opcodes = Counter(), Counter()
    for m, w in parts:
        classes.update({c: n * w for c, n in m.classes.items()})
        opcodes.update({o: n * w for o, n in m.opcodes.items()})
    return LoopMix(min(m.start for m, _ in parts), max(m.end for m, _ in parts), True,
                   sum(m.instructions * w for m, w in parts), sum(m.fma_work * w for m, w in parts),
                   dict(classes), dict(opcodes))


def loop_with_fma(instrs, fma_work: int, without=("LDG", "STG", "MUFU")):
    """The innermost loop doing exactly `fma_work` FMAs per iteration and none of the opcodes `without`
    (a conv's row segment on shared memory: k*k taps x outputs, no global access, no special function),
    or None. Picks the conv loop where an epilogue loop does as much FMA or more (an activation's
    polynomial at a small k)."""
    hits = [m for m in innermost_fma_loops(instrs)
            if m.fma_work == fma_work and not any(m.opcodes.get(op) for op in without)]
    return max(hits, key=lambda m: m.instructions) if hits else None


def main_loop_mix(instrs) -> LoopMix:
    """The mix of the largest innermost loop, FMA work or not (the grid-stride loop of an elementwise
    kernel); the whole body when the function has no loop."""
    ranges = loops(instrs)
    inner = [(s, e) for s, e in ranges if not any((o != (s, e)) and s <= o[0] and o[1] <= e for o in ranges)]
    if not inner:
        return _mix(instrs, instrs[0].addr, instrs[-1].addr, False) if instrs else LoopMix(0, 0, False, 0, 0, {}, {})
    return max((_mix(instrs, s, e, True) for s, e in inner), key=lambda m: m.instructions)


def hot_loop_mix(instrs) -> LoopMix:
    """The instruction mix of the innermost loop that does the most FMA work (see the module docstring)."""
    if not instrs:
        return LoopMix(0, 0, False, 0, 0, {}, {})
    innermost = innermost_fma_loops(instrs)
    if innermost:
        return max(innermost, key=lambda m: (m.fma_work, -m.instructions))
    return _mix(instrs, instrs[0].addr, instrs[-1].addr, False)


def demangle(name: str) -> str:
    """A readable kernel name: `c++filt` when present, else the mangled name."""
    cf = shutil.which("c++filt")
    if cf is None:
        return name
    try:
        return subprocess.run([cf, name], capture_output=True, text=True, timeout=30).stdout.strip() or name
    except (OSError, subprocess.TimeoutExpired):
        return name


_DEMANGLED: dict = {}


def demangle_cached(name: str) -> str:
    """demangle() with a cache; demangle_all() fills it for many names in one c++filt call."""
    if name not in _DEMANGLED:
        _DEMANGLED[name] = demangle(name)
    return _DEMANGLED[name]


def demangle_all(names) -> None:
    names = [n for n in names if n not in _DEMANGLED]
    cf = shutil.which("c++filt")
    if not names or cf is None:
        return
    r = subprocess.run([cf], input="\n".join(names), capture_output=True, text=True, timeout=60)
    outs = r.stdout.splitlines()
    if len(outs) == len(names):
        _DEMANGLED.update(zip(names, outs))
