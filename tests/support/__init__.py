"""Test helpers in one place: evidence built to the vendors' specifications (snp, tdx, cca, checks),
the emulator and key servers the fixtures run, RCAR by hand (kbs), a PCS stand-in (pcs)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Real evidence from public projects, read at test time (never copied into the repository).
VECTORS = REPO.parent / "shared" / "vectors"
