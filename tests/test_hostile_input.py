"""Careless and hostile input: damaged directories made by the shard writer, each refused in words
(file, field, fix) with the exit code for its kind, never a traceback."""

import json
import os
import shutil
import stat
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from vllm_gds.cli import main
from vllm_gds.errors import EXIT_DAMAGED, EXIT_REFUSED, EXIT_UNREADABLE, ManifestError, ShardReadError
from vllm_gds import checksum
from vllm_gds.shards.manifest import (
    ALIGNMENT, BEFORE_POST_PROCESSING, MANIFEST_NAME, Manifest, read_manifest, write_manifest,
)
from vllm_gds.shards.safetensors_layout import PADDING_PREFIX, check_like_safetensors, read_header
from vllm_gds.shards.writer import write_rank
from manifest_edits import edit_manifest


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [("embed.weight", torch.randn(64, 33, generator=g)), ("norm.weight", torch.randn(7, generator=g)),
            ("proj.weight", torch.randn(40, 40, generator=g).to(torch.bfloat16))]


def _write_prepared(out, tiny_model, tensors=None):
    out.mkdir()
    rank = write_rank(out, tensors or _tensors(), tp_rank=0, pp_rank=0, tensor_parallel_size=1)
    write_manifest(out, Manifest(
        tensor_parallel_size=1, pipeline_parallel_size=1, dtype="float32", quantization=None,
        vllm_version="0.32.0", platform={"device_type": "cpu", "compute_capability": None},
        capture_point=BEFORE_POST_PROCESSING, checksum_algorithm=checksum.ALGORITHM, alignment=ALIGNMENT,
        ranks=(rank,), source="/models/tiny", created="2026-12-04T00:00:00+00:00",
    ))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny_model / name, out / name)
    return out


@pytest.fixture
def prepared(tmp_path, tiny_model):
    return _write_prepared(tmp_path / "m", tiny_model)


def _manifest_text(model, edit):
    path = model / MANIFEST_NAME
    path.write_text(edit(path.read_text()))


def _first_file(raw):
    return raw["ranks"][0]["files"][0]


def _rewrite_header(path, edit):
    """Edit a shard's safetensors header in place, keeping its length (it is padded with spaces)."""
    data_start, header = read_header(path)
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    length = data_start - 8
    assert len(text) <= length
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", length) + text + b" " * (length - len(text)))


def _inspect(model, capsys, *extra):
    code = main(["inspect", str(model), *extra])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out + captured.err


def test_writer_output_passes_the_safetensors_rules(prepared, capsys):
    shard = read_manifest(prepared).ranks[0].files[0]
    check_like_safetensors(*read_header(prepared / shard.path), shard.size)
    code, out = _inspect(prepared, capsys)
    assert code == 0, out
    assert "all ranks intact, config and tokenizer present" in out


# --- the manifest: numbers, types, fields -------------------------------------------------------

@pytest.mark.parametrize("edit, message", [
    (lambda r: _first_file(r)["tensors"][0].update(checksum="not-hex-at-all!!"),
     "checksum 'not-hex-at-all!!' is not 16 lower-case hex digits"),
    (lambda r: _first_file(r)["tensors"][0].update(shape=[-64, -33]),
     "shape must be a list of non-negative integers, not \\[-64, -33\\]"),
    (lambda r: _first_file(r)["tensors"][0].update(offset=float(_first_file(r)["tensors"][0]["offset"])),
     "offset must be an integer >= 0, not 4096.0"),
    (lambda r: r["ranks"][0].update(rank="0"), "rank must be an integer >= 0, not '0'"),
    (lambda r: r.update(checksum_algorithm="sha256"), "checksum_algorithm 'sha256' is not 'wsum64-v1'"),
    (lambda r: r.update(alignment=1), "alignment 1 is not 4096"),
    (lambda r: r.update(extra_field=1), "unknown field\\(s\\) 'extra_field'"),
    (lambda r: _first_file(r)["tensors"].append(dict(_first_file(r)["tensors"][0])),
     "tensor\\(s\\) \\['embed.weight'\\] are listed more than once"),
    (lambda r: r["ranks"][0]["files"].append(dict(_first_file(r))), "are listed more than once"),
    (lambda r: _first_file(r)["tensors"][1].update(offset=_first_file(r)["tensors"][0]["offset"]),
     "overlap"),
])
def test_ill_typed_or_unknown_manifest_fields_are_refused(prepared, capsys, edit, message):
    edit_manifest(prepared, edit)
    with pytest.raises(ManifestError, match=message):
        read_manifest(prepared)
    code, out = _inspect(prepared, capsys)
    assert code == EXIT_DAMAGED and f"{prepared / MANIFEST_NAME}" in out and "prepare the directory again" in out


def test_infinity_and_deep_nesting_in_the_manifest_are_refused(prepared, capsys):
    _manifest_text(prepared, lambda t: t.replace('"offset": 4096', '"offset": Infinity', 1))
    code, out = _inspect(prepared, capsys)
    assert code == EXIT_DAMAGED and "Infinity is not a number JSON allows" in out
    _manifest_text(prepared, lambda t: t.replace('"offset": Infinity', '"offset": 4096'))
    _manifest_text(prepared, lambda t: t.replace('"/models/tiny"', "[" * 100_000 + "]" * 100_000))
    code, out = _inspect(prepared, capsys)
    assert code == EXIT_DAMAGED and "nested too deeply" in out and MANIFEST_NAME in out


def test_an_oversized_manifest_is_refused_before_it_is_parsed(prepared, capsys):
    edit_manifest(prepared, lambda r: r.update(source="x" * (65 << 20)))
    code, out = _inspect(prepared, capsys)
    assert code == EXIT_DAMAGED and "is larger than 64 MiB" in out
    assert len(out) < 10_000  # the source is not echoed


# --- shard headers: as strict as safetensors ------------------------------------------------------

def _shard(model):
    shard = read_manifest(model).ranks[0].files[0]
    return shard, model / shard.path


def test_overlapping_tensors_in_the_header_are_refused_like_safetensors(prepared, capsys):
    shard, path = _shard(prepared)
    first, second = shard.tensors[0], shard.tensors[1]

    def overlap(header):  # norm.weight now starts inside embed.weight; the manifest is edited to match
        begin = header[first.name]["data_offsets"][0]
        header[second.name]["data_offsets"] = [begin, begin + second.nbytes]
    _rewrite_header(path, overlap)
    data_start, _ = read_header(path)
    edit_manifest(prepared, lambda r: _first_file(r)["tensors"][1].update(offset=first.offset))
    with pytest.raises(Exception):
        with safe_open(path, framework="pt"):
            pass
    with pytest.raises(ValueError, match="entries '(embed|norm).weight' and '(embed|norm).weight' overlap"):
        check_like_safetensors(data_start, read_header(path)[1], shard.size)
    code, out = _inspect(prepared, capsys, "--no-checksums")
    assert code == EXIT_DAMAGED
    assert f"in {shard.path} overlap" in out and MANIFEST_NAME in out


def test_a_padding_entry_of_the_wrong_shape_is_refused_like_safetensors(prepared, capsys):
    _, path = _shard(prepared)

    def bad_padding(header):
        name = next(n for n in header if n.startswith(PADDING_PREFIX))
        header[name]["shape"] = [header[name]["shape"][0] + 8]
    _rewrite_header(path, bad_padding)
    with pytest.raises(Exception):
        with safe_open(path, framework="pt"):
            pass
    code, out = _inspect(prepared, capsys, "--no-checksums")
    assert code == EXIT_DAMAGED and "padding" in out and "needs" in out


def test_negative_dimensions_and_deep_nesting_in_a_header_are_refused(prepared, capsys):
    _, path = _shard(prepared)
    _rewrite_header(path, lambda h: h["norm.weight"].update(shape=[-7]))
    code, out = _inspect(prepared, capsys, "--no-checksums")
    assert code == EXIT_DAMAGED and "shape [-7] is not a list of non-negative integers" in out
    data_start, _ = read_header(path)
    nested = b"[" * 1900 + b"]" * 1900
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", data_start - 8) + nested + b" " * (data_start - 8 - len(nested)))
    code, out = _inspect(prepared, capsys, "--no-checksums")
    assert code == EXIT_DAMAGED and "nested too deeply" in out


# --- what the operating system refuses: exit code 3 ----------------------------------------------

def test_a_fifo_in_place_of_a_shard_is_not_a_regular_file(prepared, capsys):
    _, path = _shard(prepared)
    path.unlink()
    os.mkfifo(path)
    code, out = _inspect(prepared, capsys)
    assert code == EXIT_UNREADABLE
    assert f"shard file {path} is a FIFO, not a regular file: replace it with the file itself" in out


def test_a_symlink_loop_in_place_of_a_shard_is_refused(prepared, capsys):
    _, path = _shard(prepared)
    path.unlink()
    os.symlink(path.name, path)
    code, out = _inspect(prepared, capsys)
    assert code == EXIT_UNREADABLE and "points (through others) at itself" in out


def test_prepare_into_a_read_only_directory_says_so(tiny_model, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits; an immutable directory refuses root too
        if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here")
    else:
        parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        code = main(["prepare", str(tiny_model), str(parent / "out"), "--dtype", "float32"])
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(parent)])
        parent.chmod(0o755)
    err = capsys.readouterr().err
    assert code == EXIT_UNREADABLE and "Traceback" not in err
    assert f"cannot write {parent}/.out.partial-" in err and "give this user access to it" in err


# --- reading while the file changes, and memory ----------------------------------------------------

def test_truncation_while_checksums_are_read_gives_a_fix(prepared):
    from vllm_gds.shards.stream_verify import verify_file_checksums

    shard, path = _shard(prepared)
    os.truncate(path, shard.tensors[-1].offset + 10)  # after the size check, as if during the read
    with pytest.raises(ShardReadError, match=f"shard file {path} ended at byte .* inside tensor "
                                             "'proj.weight'.*copy it again or prepare it again"):
        verify_file_checksums(prepared, shard)


def test_streamed_checksum_equals_the_whole_tensor_checksum(tmp_path, monkeypatch):
    from vllm_gds.shards import stream_verify

    monkeypatch.setattr(stream_verify, "CHUNK_BYTES", 4096)
    data = torch.randint(0, 256, (3 * 4096 + 7,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "blob"
    path.write_bytes(b"\0" * 5 + data.numpy().tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        assert stream_verify.streamed_checksum(fd, 5, data.numel(), path, "t") == checksum.checksum_hex(data)
    finally:
        os.close(fd)


_PEAK_RSS = """
import resource, sys
from vllm_gds.cli import main
code = main(sys.argv[1:])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "CODE", code)
"""


def _peak_rss_mb(*argv):
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, *argv], capture_output=True, text=True, timeout=600)
    line = [l for l in proc.stdout.splitlines() if l.startswith("PEAK_KB")][-1].split()
    return int(line[1]) / 1024, int(line[3]), proc.stdout


def test_inspect_of_a_huge_sparse_tensor_stays_in_bounded_memory(tmp_path, tiny_model):
    # 1 GiB tensor whose tail is a sparse hole: zeros add nothing to the checksum, so the manifest
    # stays right while the file grows without using disk.
    small = torch.randn(1 << 20, generator=torch.Generator().manual_seed(1))
    model = _write_prepared(tmp_path / "m", tiny_model, [("big", small)])
    shard, path = _shard(model)
    numel = 1 << 28
    _rewrite_header(path, lambda h: h["big"].update(
        shape=[numel], data_offsets=[h["big"]["data_offsets"][0], h["big"]["data_offsets"][0] + 4 * numel]))
    size = shard.tensors[0].offset + 4 * numel
    os.truncate(path, size)
    edit_manifest(model, lambda r: (_first_file(r).update(size=size),
                                     _first_file(r)["tensors"][0].update(shape=[numel], nbytes=4 * numel)))
    baseline, code, out = _peak_rss_mb("inspect", str(model), "--no-checksums")
    assert code == 0, out
    peak, code, out = _peak_rss_mb("inspect", str(model))
    assert code == 0, out
    assert peak - baseline < 256, (peak, baseline)  # the tensor is 1024 MiB


# --- what serving needs besides the shards; output from files is escaped -------------------------

@pytest.mark.parametrize("remove, message", [
    (("config.json",), "config.json is missing: vLLM cannot build the model"),
    (("tokenizer.json",), "has no tokenizer"),
])
def test_inspect_checks_what_serving_needs(prepared, capsys, remove, message):
    for name in remove:
        (prepared / name).unlink()
    code, out = _inspect(prepared, capsys)
    assert code == EXIT_DAMAGED and message in out
    assert "all ranks intact, config and tokenizer present" not in out


def test_a_stray_manifest_in_a_plain_checkpoint_says_so(tmp_path, tiny_model, prepared, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model, plain, symlinks=False)
    shutil.copy2(prepared / MANIFEST_NAME, plain / MANIFEST_NAME)
    code, out = _inspect(plain, capsys)
    assert code == EXIT_DAMAGED
    assert "holds a Hugging Face checkpoint (model.safetensors) and a vllm-gds-manifest.json that lists none" in out
    assert f"Remove {plain / MANIFEST_NAME}" in out


def test_text_from_the_manifest_is_escaped(prepared, capsys):
    fake = "x\n  sizes, headers, checksums and serving files: all ranks intact\x1b[8m"
    edit_manifest(prepared, lambda r: r.update(source=fake))
    shard, path = _shard(prepared)
    with open(path, "r+b") as f:
        f.seek(shard.tensors[0].offset)
        f.write(b"\xff\xff\xff\xff")
    code, out = _inspect(prepared, capsys)
    assert code == EXIT_DAMAGED
    assert "\x1b" not in out
    assert "source        x\\n  sizes" in out
    assert not any(line.startswith("  sizes") and "all ranks intact" in line for line in out.splitlines())


def test_a_plain_directory_is_refused_not_damaged(tmp_path, capsys):
    code, out = _inspect(tmp_path, capsys)
    assert code == EXIT_REFUSED and "vllm-gds prepare MODEL OUT" in out
