"""A decode product's tuned tiling is kept on disk under a key naming what it depends on, and reused."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="Triton is not installed (the dev extra installs it on Linux x86-64)")

from shared.kernels import gemv  # noqa: E402
from shared.planning.disk_cache import cached  # noqa: E402


def test_a_tuned_tiling_is_kept_on_disk_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = gemv.tuning_key([torch.zeros(8, 4)], gated=False)
    measured = []
    for pick in (gemv.CANDIDATES[3], None):  # None: cuBLAS was fastest
        def measure(pick: gemv.Tiling | None = pick) -> gemv.Tiling | None:
            measured.append(pick)
            return pick

        first = cached(f"{key}|{pick}", measure, gemv.encode_tiling, gemv.decode_tiling, folder="tuning")
        again = cached(f"{key}|{pick}", lambda: gemv.TILING, gemv.encode_tiling, gemv.decode_tiling, folder="tuning")
        assert first == again == pick  # the second load reads the first's pick, it does not measure
    assert measured == [gemv.CANDIDATES[3], None]
    assert len(list((tmp_path / "lyra" / "tuning").glob("*.json"))) == 2


def test_the_key_names_the_shapes_the_dtype_and_the_form() -> None:
    plain = gemv.tuning_key([torch.zeros(8, 4)] * 3, gated=False)
    assert "torch.float32" in plain and "3 x (8, 4)" in plain and "gated False" in plain
    assert gemv.tuning_key([torch.zeros(8, 4)] * 3, gated=True) != plain
    assert gemv.tuning_key([torch.zeros(8, 4, dtype=torch.float16)] * 3, gated=False) != plain
    assert gemv.tuning_key([torch.zeros(8, 4)] * 2, gated=False) != plain


def test_a_plain_product_may_go_to_cublas_and_a_gated_one_never(monkeypatch: pytest.MonkeyPatch) -> None:
    timed: list[gemv.Tiling | None] = []

    def replayed(call: object, weights: list[torch.Tensor]) -> float:
        tile = call.__defaults__[0]  # the candidate the lambda closes over
        timed.append(tile)
        return 0.0 if tile is None else 1.0  # cuBLAS would win

    monkeypatch.setattr(gemv, "_replayed", replayed)
    assert gemv.fastest_tiling([torch.zeros(8, 4)], gated=False) is None
    assert None in timed
    timed.clear()
    assert gemv.fastest_tiling([torch.zeros(8, 4)], gated=True) == gemv.CANDIDATES[0]  # cuBLAS cannot apply silu
    assert None not in timed and len(timed) == len(gemv.CANDIDATES)


def test_off_cuda_the_default_tiling_is_used_without_measuring() -> None:
    assert gemv.tune([torch.zeros(8, 4)]) == gemv.TILING
