#!/usr/bin/env python3
"""Check that a build runs on any x86-64 CPU: no instruction beyond the x86-64 baseline
(SSE2) in any native library, except in the CPU backend variants that llama.cpp loads
only on a CPU that has their instructions (libggml-cpu-<variant>.so; the ``x64`` one is
the baseline variant and is checked too).

    python tools/check_portable.py dist/pyllama_mtp-*.whl     # a wheel
    python tools/check_portable.py "$(python -c 'import pyllama_mtp, os; print(os.path.dirname(pyllama_mtp.__file__))')"

Disassembles with binutils' objdump. Exit status 0 when every library passes, 1 when
one does not (each is listed with the extensions it uses and a few examples), 2 when
there is nothing to check.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import subprocess
import sys
import tempfile
import zipfile
from typing import Iterable

# The CPU backend variants the loader picks by CPU features; "x64" is the baseline one.
DISPATCHED = re.compile(r"libggml-cpu-(?!x64\.)[\w.-]+\.so$")

# Instructions beyond x86-64's baseline (SSE, SSE2), by the extension that brought them.
# tzcnt is left out: it is encoded as `rep bsf`, which a CPU without BMI1 runs as bsf
# (compilers emit it for the baseline on purpose).
EXTENSIONS = {
    "SSE3": "addsubpd addsubps haddpd haddps hsubpd hsubps lddqu movddup movshdup movsldup fisttp",
    "SSSE3": "pabsb pabsw pabsd palignr phaddw phaddd phaddsw phsubw phsubd phsubsw pmaddubsw "
             "pmulhrsw pshufb psignb psignw psignd",
    "SSE4.1": "blendpd blendps blendvpd blendvps dppd dpps extractps insertps movntdqa mpsadbw "
              "packusdw pblendvb pblendw pcmpeqq pextrb pextrd pextrq phminposuw pinsrb pinsrd "
              "pinsrq pmaxsb pmaxsd pmaxud pmaxuw pminsb pminsd pminud pminuw pmovsxbw pmovsxbd "
              "pmovsxbq pmovsxwd pmovsxwq pmovsxdq pmovzxbw pmovzxbd pmovzxbq pmovzxwd pmovzxwq "
              "pmovzxdq pmuldq pmulld ptest roundpd roundps roundsd roundss",
    "SSE4.2": "crc32b crc32w crc32l crc32q pcmpestri pcmpestrm pcmpistri pcmpistrm pcmpgtq popcnt",
    "BMI/LZCNT/MOVBE": "andn bextr blsi blsmsk blsr bzhi lzcnt mulx pdep pext rorx sarx shlx shrx "
                       "adcx adox movbe",
    "AMX": "ldtilecfg sttilecfg tilerelease tilezero tileloadd tileloaddt1 tilestored tdpbssd "
           "tdpbsud tdpbusd tdpbuud tdpbf16ps",
}
MNEMONIC_EXTENSION = {name: ext for ext, names in EXTENSIONS.items() for name in names.split()}
# VEX/EVEX-encoded (AVX and later) instructions all start with "v"; these do not.
NOT_VEX = {"verr", "verw", "vmcall", "vmlaunch", "vmresume", "vmxoff", "vmxon", "vmread",
           "vmwrite", "vmptrld", "vmptrst", "vmclear", "vmfunc"}
INSTRUCTION = re.compile(r"^\s*[0-9a-f]+:\s+(?:(?:rex\S*|lock|rep\w*|notrack|bnd|data16|addr32|\{\w+\})\s+)*"
                         r"([a-z][a-z0-9.]*)\s*(.*)$")


def extension_of(mnemonic: str, operands: str) -> str | None:
    """The extension beyond the baseline an instruction needs, or None."""
    # objdump may add an AT&T size suffix (popcntq, movbel); crc32 keeps its own.
    for name in (mnemonic, mnemonic[:-1] if mnemonic[-1:] in "bwlq" else None):
        if name in MNEMONIC_EXTENSION:
            return MNEMONIC_EXTENSION[name]
    if mnemonic.startswith("v") and mnemonic not in NOT_VEX:
        return "AVX-512" if re.search(r"%zmm|%k[0-7]|\{", operands) else "AVX/AVX2/FMA/F16C"
    if "%ymm" in operands or "%zmm" in operands:
        return "AVX"
    return None


def is_x86_64_elf(path: pathlib.Path) -> bool:
    with open(path, "rb") as handle:
        header = handle.read(20)
    # ELF magic, 64-bit class, machine EM_X86_64 (62, little-endian at offset 18).
    return len(header) == 20 and header[:4] == b"\x7fELF" and header[4] == 2 and header[18:20] == b"\x3e\x00"


def scan(library: pathlib.Path) -> dict[str, list[str]]:
    """Extension -> the first few offending instructions of one library."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True,
                             text=True, check=True).stdout
    found: dict[str, list[str]] = collections.defaultdict(list)
    function = "?"
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line.split("<", 1)[-1][:-2]
            continue
        match = INSTRUCTION.match(line)
        if not match:
            continue
        extension = extension_of(match.group(1), match.group(2))
        if extension and len(found[extension]) < 1000:
            found[extension].append(f"{match.group(1)} {match.group(2)}  in {function}".strip())
    return dict(found)


def libraries(root: pathlib.Path) -> Iterable[pathlib.Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and is_x86_64_elf(path):
            yield path


def check(roots: Iterable[pathlib.Path], *, out=sys.stdout) -> tuple[int, int, list[str]]:
    """(checked, skipped as dispatched variants, failures); prints one line per library."""
    checked, dispatched, failures = 0, 0, []
    for root in roots:
        for library in libraries(root):
            name = library.relative_to(root)
            if DISPATCHED.search(library.name):
                dispatched += 1
                print(f"  dispatched variant (loaded only where the CPU has it): {name}", file=out)
                continue
            checked += 1
            found = scan(library)
            if found:
                counts = ", ".join(f"{ext}: {len(hits)}" for ext, hits in sorted(found.items()))
                examples = "; ".join(hits[0] for hits in found.values())
                failures.append(f"{name}: {counts} (e.g. {examples})")
                print(f"  BEYOND BASELINE {name}: {counts}", file=out)
            else:
                print(f"  baseline x86-64: {name}", file=out)
    return checked, dispatched, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=pathlib.Path, help="wheels or folders")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        roots = []
        for index, path in enumerate(args.paths):
            if path.suffix == ".whl":
                root = pathlib.Path(scratch) / str(index)
                zipfile.ZipFile(path).extractall(root)
                roots.append(root)
            else:
                roots.append(path)
        checked, dispatched, failures = check(roots)
    print(f"check_portable: {checked} libraries checked, {dispatched} dispatched CPU variants left out, "
          f"{len(failures)} beyond the x86-64 baseline")
    for failure in failures:
        print(f"  {failure}")
    if checked == 0:
        print("check_portable: no x86-64 library found", file=sys.stderr)
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
