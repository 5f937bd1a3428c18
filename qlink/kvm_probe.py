"""The KVM probe's firmware and how its run is judged. Pure: no host I/O (`host.py` runs it).

Why a firmware of our own: on nested or half-broken KVM hosts `/dev/kvm` opens, a vCPU
runs a few real-mode instructions, and yet every Linux guest hangs right after the kernel's
real-mode setup prints `Probing EDD ... ok`, which is where it leaves real mode. So the
probe does what every x86-64 kernel does before it prints anything else, in the same order:

    reset vector (real mode, CS:IP = F000:FFF0)
     └─ far jump into the ROM, lgdt, CR0.PE            stage 'R' written to port 0xe9
         └─ protected mode, 32-bit code segment        stage 'P'
             └─ page tables, CR4.PAE, EFER.LME, CR0.PG
                 └─ long mode, 64-bit code segment     stage 'L'
                     └─ a 64-bit shift computes the exit code, out to isa-debug-exit

Each stage writes one byte to QEMU's debug console (port 0xe9), so a probe that times out
says how far the vCPU got. `isa-debug-exit` makes QEMU exit with (value << 1) | 1; the
value is the top byte of a 64-bit immediate, so only code that really ran in long mode can
produce the expected status.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

FIRMWARE_SIZE = 64 * 1024
"""A 64 KiB `-bios` image is mapped at 0xF0000-0xFFFFF (and at the top of 4 GiB)."""
_ROM_BASE = 0xF0000

DEBUG_EXIT_PORT = 0xF4
DEBUG_CONSOLE_PORT = 0xE9
_EXIT_VALUE = 0x31
EXPECTED_EXIT_STATUS = (_EXIT_VALUE << 1) | 1  # 99
STAGES = {"R": "real mode", "P": "protected mode", "L": "long mode"}

# Where each piece sits in the image (offsets are also real-mode offsets in segment F000).
_GDT = 0x100
_GDTR = 0x140
_REAL_MODE = 0x200
_PROTECTED_MODE = 0x300
_LONG_MODE = 0x400
_RESET_VECTOR = 0xFFF0

# Page tables in guest RAM: PML4 → PDPT → PD, one 2 MiB page identity-mapping the ROM.
_PML4, _PDPT, _PD = 0x1000, 0x2000, 0x3000
_CODE32, _DATA, _CODE64 = 0x08, 0x10, 0x18


def _u16(value: int) -> bytes:
    return struct.pack("<H", value)


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def _stage(marker: str) -> bytes:
    """mov al, MARKER; out 0xe9, al (the same encoding in 16-, 32- and 64-bit code)."""
    return bytes([0xB0, ord(marker), 0xE6, DEBUG_CONSOLE_PORT])


def _real_mode() -> bytes:
    return b"".join(
        [
            b"\xfa",  # cli
            _stage("R"),
            b"\x2e\x66\x0f\x01\x16" + _u16(_GDTR),  # o32 lgdt cs:[GDTR]: a 32-bit base
            b"\x0f\x20\xc0",  # mov eax, cr0
            b"\x0c\x01",  # or al, 1 (PE)
            b"\x0f\x22\xc0",  # mov cr0, eax
            b"\x66\xea" + _u32(_ROM_BASE + _PROTECTED_MODE) + _u16(_CODE32),  # jmp far 08:pm
        ]
    )


def _protected_mode() -> bytes:
    tables = b"".join(
        b"\xc7\x05" + _u32(address) + _u32(entry)  # mov dword [address], entry
        for address, entry in (
            (_PML4, _PDPT | 0x3),  # present, writable
            (_PDPT, _PD | 0x3),
            (_PD, 0x83),  # present, writable, a 2 MiB page at 0
        )
    )
    return b"".join(
        [
            b"\x66\xb8" + _u16(_DATA),  # mov ax, DATA
            b"\x8e\xd8\x8e\xc0\x8e\xd0",  # mov ds, ax; mov es, ax; mov ss, ax
            _stage("P"),
            b"\xbf" + _u32(_PML4),  # mov edi, PML4
            b"\x31\xc0",  # xor eax, eax
            b"\xb9" + _u32(3 * 4096 // 4),  # mov ecx, dwords of three tables
            b"\xf3\xab",  # rep stosd
            tables,
            b"\x0f\x20\xe0\x83\xc8\x20\x0f\x22\xe0",  # cr4 |= PAE
            b"\xb8" + _u32(_PML4) + b"\x0f\x22\xd8",  # cr3 = PML4
            b"\xb9" + _u32(0xC0000080) + b"\x0f\x32",  # rdmsr EFER
            b"\x0d" + _u32(0x100) + b"\x0f\x30",  # EFER |= LME; wrmsr
            b"\x0f\x20\xc0\x0d" + _u32(0x80000000) + b"\x0f\x22\xc0",  # cr0 |= PG
            b"\xea" + _u32(_ROM_BASE + _LONG_MODE) + _u16(_CODE64),  # jmp far 18:lm
        ]
    )


def _long_mode() -> bytes:
    return b"".join(
        [
            _stage("L"),
            b"\x48\xb8" + struct.pack("<Q", (_EXIT_VALUE << 56) | 0x00ABCDEF12345678),  # mov rax
            b"\x48\xc1\xe8\x38",  # shr rax, 56
            bytes([0xE6, DEBUG_EXIT_PORT]),  # out 0xf4, al: QEMU exits
            b"\xf4\xeb\xfd",  # hlt; jmp back to hlt
        ]
    )


def firmware() -> bytes:
    """The probe's `-bios` image."""
    image = bytearray(b"\xf4" * FIRMWARE_SIZE)  # hlt everywhere else

    def place(offset: int, code: bytes) -> None:
        image[offset : offset + len(code)] = code

    # Null, 32-bit code, data, 64-bit code (L=1): flat, base 0, 4 GiB.
    place(_GDT, struct.pack("<4Q", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF, 0x00AF9A000000FFFF))
    place(_GDTR, struct.pack("<HI", 4 * 8 - 1, _ROM_BASE + _GDT))
    place(_REAL_MODE, _real_mode())
    place(_PROTECTED_MODE, _protected_mode())
    place(_LONG_MODE, _long_mode())
    place(_RESET_VECTOR, b"\xea" + _u16(_REAL_MODE) + _u16(0xF000))  # jmp far F000:real mode
    return bytes(image)


@dataclass(frozen=True, slots=True)
class KvmVerdict:
    usable: bool
    reason: str


def judge(
    returncode: int | None, stages: str, stderr: str, timeout: float, cpu_model: str
) -> KvmVerdict:
    """The verdict on one probe run: `returncode` None means it was killed at `timeout`;
    `stages` is what the firmware wrote to the debug console."""
    reached = [STAGES[marker] for marker in stages if marker in STAGES]
    if returncode == EXPECTED_EXIT_STATUS and stages.endswith("L"):
        return KvmVerdict(
            True, f"a KVM vCPU (-cpu {cpu_model}) entered long mode and ran 64-bit code"
        )
    progress = (
        f"it reached {reached[-1]} and went no further"
        if reached
        else "it ran no instruction of the probe"
    )
    if returncode is None:
        return KvmVerdict(
            False,
            f"a KVM vCPU (-cpu {cpu_model}) did not finish the probe within {timeout:g} s: "
            f"{progress} (guest kernels hang the same way, right after `Probing EDD`)",
        )
    first_line = next((line for line in stderr.splitlines() if "error" in line.lower()), "")
    first_line = first_line or (stderr.strip().splitlines() or ["no message"])[0]
    return KvmVerdict(
        False, f"the KVM probe (-cpu {cpu_model}) exited {returncode}: {first_line}; {progress}"
    )
