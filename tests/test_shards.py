"""The shard format: aligned files that plain safetensors readers open, manifests, checksums."""

import pytest
import torch
from safetensors import safe_open

from vllm_gds.errors import ManifestError
from vllm_gds import checksum
from vllm_gds.shards.manifest import ALIGNMENT, MANIFEST_NAME, read_manifest
from vllm_gds.shards.safetensors_layout import PADDING_PREFIX, tensor_placements
from vllm_gds.shards.writer import write_rank
from manifest_edits import edit_manifest


def _random_tensors(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7,), (33, 65), (1,), (4096,), (3, 5, 7), (0, 4), (1000, 3)]
    kinds = [torch.float32, torch.bfloat16, torch.int8, torch.float16, torch.int64, torch.float32, torch.bfloat16]
    out = []
    for i, (shape, dtype) in enumerate(zip(shapes, kinds)):
        t = torch.randn(shape, generator=g) * 10
        out.append((f"layer.{i}.weight", t.to(dtype)))
    out.append(("scalar", torch.tensor(3.5)))
    out.append(("fp8", (torch.randn(16, 16, generator=g)).to(torch.float8_e4m3fn)))
    return out


@pytest.mark.parametrize("max_file_bytes", [1 << 30, 10_000])
def test_written_files_are_aligned_and_open_in_safetensors(tmp_path, max_file_bytes):
    tensors = _random_tensors(0)
    shards = write_rank(tmp_path, tensors, tp_rank=0, pp_rank=0, tensor_parallel_size=1,
                        max_file_bytes=max_file_bytes)
    if max_file_bytes == 10_000:
        assert len(shards.files) > 1
    by_name = dict(tensors)
    seen = set()
    for shard in shards.files:
        path = tmp_path / shard.path
        assert path.stat().st_size == shard.size
        for entry in shard.tensors:
            assert entry.offset % ALIGNMENT == 0
        assert [p.offset for p in tensor_placements(path)] == [e.offset for e in shard.tensors]
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if name.startswith(PADDING_PREFIX):
                    continue
                got, want = f.get_tensor(name), by_name[name]
                assert got.dtype == want.dtype and got.shape == want.shape
                assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
                seen.add(name)
    assert seen == set(by_name)


def test_checksum_detects_flips_and_swaps():
    g = torch.Generator().manual_seed(1)
    base = torch.randint(-(2**31), 2**31 - 1, (10_001,), dtype=torch.int32, generator=g)
    reference = checksum.checksum_hex(base)
    assert checksum.checksum_hex(base.clone()) == reference
    for index, bit in [(0, 0), (5000, 31), (10_000, 7)]:
        flipped = base.clone()
        flipped[index] ^= 1 << bit
        assert checksum.checksum_hex(flipped) != reference
    swapped = base.clone()
    swapped[[10, 11]] = swapped[[11, 10]]
    assert checksum.checksum_hex(swapped) != reference
    tail = torch.arange(7, dtype=torch.uint8)  # 1 word plus a 3-byte tail
    bumped = tail.clone()
    bumped[6] += 1
    assert checksum.checksum_hex(tail) != checksum.checksum_hex(bumped)


def test_checksum_matches_a_float64_reference_across_chunks(monkeypatch):
    monkeypatch.setattr(checksum, "_CHUNK_WORDS", 1000)
    monkeypatch.setattr(checksum, "_weights", {})
    data = torch.randint(0, 256, (4 * 2500 + 3,), dtype=torch.uint8)
    words = data[:10_000].view(torch.int32).tolist()
    tail = data[10_000:].tolist()
    expected = sum(w * (i + 1) for i, w in enumerate(words)) + sum(b * (2500 + j + 1) for j, b in enumerate(tail))
    assert checksum.checksum_hex(data) == checksum.format_checksum(expected)


def _prepared_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_manifest_says_how_to_prepare(tmp_path):
    with pytest.raises(ManifestError, match="vllm-gds prepare MODEL OUT --tensor-parallel-size N"):
        read_manifest(tmp_path)


def test_malformed_manifest_json_names_the_file(tmp_path, prepared_tiny):
    model = _prepared_copy(prepared_tiny, tmp_path / "m")
    (model / MANIFEST_NAME).write_text('{"format": "vllm-gds-shards", ')
    with pytest.raises(ManifestError, match=f"{MANIFEST_NAME} is not valid JSON.*prepare it again"):
        read_manifest(model)


def test_manifest_pointing_outside_its_directory_is_refused(tmp_path, prepared_tiny):
    model = _prepared_copy(prepared_tiny, tmp_path / "m")
    edit_manifest(model, lambda raw: raw["ranks"][0]["files"][0].update(path="../../etc/passwd"))
    with pytest.raises(ManifestError, match="points outside the prepared directory.*refused"):
        read_manifest(model)
    edit_manifest(model, lambda raw: raw["ranks"][0]["files"][0].update(path="/etc/passwd"))
    with pytest.raises(ManifestError, match="must be relative"):
        read_manifest(model)


def test_manifest_with_a_missing_rank_is_refused(tmp_path, prepared_tiny_tp2):
    model = _prepared_copy(prepared_tiny_tp2, tmp_path / "m")
    edit_manifest(model, lambda raw: raw["ranks"].pop())
    with pytest.raises(ManifestError, match="do not match the layout tp=2"):
        read_manifest(model)


def test_manifest_with_unaligned_offset_is_refused(tmp_path, prepared_tiny):
    model = _prepared_copy(prepared_tiny, tmp_path / "m")
    edit_manifest(model, lambda raw: raw["ranks"][0]["files"][0]["tensors"][0].update(offset=4097))
    with pytest.raises(ManifestError, match="not aligned"):
        read_manifest(model)
