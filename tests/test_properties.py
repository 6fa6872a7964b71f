"""Property-based tests (hypothesis): the spec and option parsers, config validation and the archive
reader never fail with anything but the documented ``SparsekitError`` subclasses, whatever they are
fed. Example counts are small on purpose (CI runs on 2 cores); the generators stay away from inputs
that are valid but huge (``synthetic:n=999999``) or that would scan the filesystem (``folder:/``).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sparsekit.errors import SparsekitError

# SPARSEKIT_PROPERTY_EXAMPLES=1000 for a deeper local search
FAST = settings(max_examples=int(os.environ.get("SPARSEKIT_PROPERTY_EXAMPLES", "40")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
SAFE_CHARS = st.characters(blacklist_characters="/\\~\x00", blacklist_categories=("Cs",))
SPEC_CHARS = "abcdefgnrstxyz0123456789=,:.-_ "


def expect_documented(fn, *args, **kwargs):
    """Call ``fn``; a SparsekitError is fine (return None), anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except SparsekitError as exc:
        assert exc.message and "\n" not in exc.message
        assert 1 < exc.exit_code < 6
        return None


@pytest.fixture(scope="module")
def scratch_cwd():
    """A working directory holding a few small data files, so relative specs find something."""
    import numpy as np

    old = os.getcwd()
    d = Path(tempfile.mkdtemp(prefix="sk-props-"))
    with open(d / "a.npz", "wb") as fh:
        np.savez(fh, x=np.zeros((6, 3), np.float32), y=np.array([0, 1] * 3))
    (d / "b.csv").write_text("1,2,0\n3,4,1\n5,6,0\n7,8,1\n")
    (d / "c.npz").write_bytes(b"PK\x03\x04 not really")
    os.chdir(d)
    yield d
    os.chdir(old)
    shutil.rmtree(d, ignore_errors=True)


KINDS = st.sampled_from(["digits", "synthetic", "synthetic-image", "npz", "csv", "folder", "mnist", ""])


@FAST
@given(kind=KINDS, sep=st.sampled_from([":", "", "::"]), rest=st.text(alphabet=SPEC_CHARS, max_size=14),
       val=st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.2, 0.5]))
def test_dataset_specs_raise_only_documented_errors(scratch_cwd, kind, sep, rest, val):
    spec = f"{kind}{sep}{rest}"
    assume(not re.search(r"\d{3}", spec) and ".." not in spec)  # no huge synthetic data, no parent dirs
    from sparsekit.data import load_dataset

    ds = expect_documented(load_dataset, spec, val_fraction=val)
    if ds is not None:
        assert len(ds.x_train) == len(ds.y_train) > 0


@FAST
@given(st.lists(st.text(max_size=24), max_size=4))
def test_model_kwargs_parser_raises_only_documented_errors(pairs):
    from sparsekit.models import parse_model_kwargs

    out = expect_documented(parse_model_kwargs, pairs)
    if out is not None:
        assert isinstance(out, dict) and len(out) == len(pairs)


@FAST
@given(st.lists(st.text(max_size=24), max_size=4), st.sampled_from(["--method-option", "--layer-density"]))
def test_key_value_pairs_parser_raises_only_documented_errors(pairs, flag):
    from sparsekit.cli.train import parse_pairs

    out = expect_documented(parse_pairs, pairs, flag)
    if out is not None:
        assert all(isinstance(k, str) and k for k in out)


VALUES = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
          | st.text(max_size=8) | st.lists(st.integers(-3, 300), max_size=3)
          | st.dictionaries(st.text(max_size=4), st.floats(), max_size=2))


def _config_fields() -> list[str]:
    import dataclasses

    from sparsekit.config import TrainConfig

    skip = {"model", "data", "init_from"}  # names resolved later, by the registries (tested elsewhere)
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in skip]


def _method_option_names() -> list[str]:
    from sparsekit.methods import METHODS

    return sorted({k for cls in METHODS.values() for k in cls.defaults})


@FAST
@given(data=st.data())
def test_config_validation_raises_only_documented_errors(data):
    from sparsekit.config import build_config
    from sparsekit.methods import METHODS

    cli = data.draw(st.dictionaries(st.sampled_from(_config_fields()), VALUES, max_size=3))
    cli["method"] = data.draw(st.sampled_from(sorted(METHODS)) | st.text(max_size=6))
    opts = data.draw(st.dictionaries(st.sampled_from(_method_option_names()), VALUES, max_size=2))
    cfg = expect_documented(build_config, None, cli, opts)
    if cfg is not None:
        assert cfg.validate() is cfg


@FAST
@given(text=st.text(max_size=80), suffix=st.sampled_from([".yaml", ".json", ".toml", ".yml"]))
def test_config_files_raise_only_documented_errors(text, suffix):
    from sparsekit.config import build_config

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"c{suffix}"
        p.write_text(text, encoding="utf-8", errors="surrogatepass")
        expect_documented(build_config, p, {}, {})


# ------------------------------------------------------------------------------------------ archives

@pytest.fixture(scope="module")
def real_archive(tmp_path_factory) -> bytes:
    from conftest import run_cli

    base = tmp_path_factory.mktemp("props-archive")
    res = run_cli(["train", "--epochs", "1", "--data", "synthetic:n=64,test=32", "--model-kwargs", "hidden=8",
                   "-q", "--device", "cpu", "--out", str(base / "run")])
    assert res.exit_code == 0, res.stderr
    res = run_cli(["export", str(base / "run"), "--format", "compressed", "--out", str(base / "exp")])
    assert res.exit_code == 0, res.stderr
    return (base / "exp" / "model.skz").read_bytes()


def _read_archive(blob: bytes) -> None:
    from sparsekit.exporters.compressed import load_archive, load_state_dict

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.skz"
        p.write_bytes(blob)
        for fn in (load_state_dict, load_archive):
            expect_documented(fn, p)
        assert sorted(os.listdir(d)) == ["x.skz"]  # reading never extracts anything


def test_the_real_archive_reads_back(real_archive):
    from sparsekit.exporters.compressed import load_state_dict

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.skz"
        p.write_bytes(real_archive)
        assert load_state_dict(p)


@FAST
@given(st.binary(max_size=200) | st.binary(max_size=60).map(lambda b: b"PK\x03\x04" + b))
def test_archive_reader_random_bytes(blob):
    _read_archive(blob)


@FAST
@given(data=st.data())
def test_archive_reader_mutated_real_archive(real_archive, data):
    blob = bytearray(real_archive)
    how = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= data.draw(st.integers(1, 255))
    else:
        i = data.draw(st.integers(0, len(blob)))
        blob[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    _read_archive(bytes(blob))


def _members_of(real: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(real)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


NAMES = st.sampled_from(["../x", "/etc/passwd", "a/../../b", "C:\\x", "ok.bin", "dir/ok", "..", "manifest.json"])


@FAST
@given(data=st.data())
def test_archive_reader_hostile_manifests_and_member_names(real_archive, data):
    """Rewritten manifests (random values, blob names that escape the archive) and extra members."""
    members = _members_of(real_archive)
    manifest = json.loads(members["manifest.json"])
    tensors = manifest.get("tensors") or []
    if tensors and data.draw(st.booleans()):
        entry = tensors[data.draw(st.integers(0, len(tensors) - 1))]
        key = data.draw(st.sampled_from(sorted(entry)))
        value = data.draw(VALUES | NAMES)
        entry[key] = value
    if data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(manifest)))
        value = data.draw(VALUES | NAMES)
        manifest[key] = value
    members["manifest.json"] = json.dumps(manifest).encode()
    if data.draw(st.booleans()):
        members[data.draw(NAMES)] = b"{}"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    _read_archive(buf.getvalue())


def _rewritten(real: bytes, edit) -> bytes:
    members = _members_of(real)
    manifest = json.loads(members["manifest.json"])
    edit(manifest)
    members["manifest.json"] = json.dumps(manifest).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return buf.getvalue()


# Crashes the property tests once found in exporters/compressed.py, kept as regression cases: each must be
# refused with its own one-line InputError (a summary that is not a mapping only matters to load_archive;
# load_state_dict reads the tensors alone and must return them unchanged).
FIXED_BUGS = [
    ("tensor-name-not-a-string", lambda m: m["tensors"][0].update(name=[1, 2]),  # TypeError, Archive.tensors
     r"manifest tensor entry .* has no name", True),
    ("summary-not-a-mapping", lambda m: m.update(summary=[1, 2]),  # ValueError/TypeError, load_archive
     "manifest summary is not an object", False),
    ("tensor-entry-not-a-mapping", lambda m: m.update(tensors=[0]),  # TypeError, Archive.tensors
     "manifest tensor entry '0' has no name", True),
]


def _unsupported_zip_version(real: bytes) -> bytes:
    """The real archive with its central directory claiming 'version needed to extract' 8.4."""
    blob = bytearray(real)
    at = blob.index(b"PK\x01\x02")
    blob[at + 6:at + 8] = (84).to_bytes(2, "little")
    return bytes(blob)


def _refused(blob: bytes, fragment: str, real: bytes | None = None) -> None:
    """Both readers refuse ``blob`` with a one-line InputError matching ``fragment`` and extract nothing;
    with ``real``, load_state_dict instead returns the real archive's tensors (it never reads the summary)."""
    from sparsekit.exporters.compressed import load_archive, load_state_dict

    from sparsekit.errors import InputError

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.skz"
        p.write_bytes(blob)
        readers = [load_archive] if real is not None else [load_state_dict, load_archive]
        for fn in readers:
            with pytest.raises(InputError, match=fragment) as info:
                fn(p)
            assert info.value.exit_code == 2 and "\n" not in info.value.message
            assert info.value.message.startswith("corrupt or truncated archive: ")
        if real is not None:
            got = load_state_dict(p)
            (Path(d) / "real.skz").write_bytes(real)
            want = load_state_dict(Path(d) / "real.skz")
            assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)
            (Path(d) / "real.skz").unlink()
        assert sorted(os.listdir(d)) == ["x.skz"]  # reading never extracts anything


def test_unsupported_zip_version_is_a_documented_error(real_archive):
    _refused(_unsupported_zip_version(real_archive), "corrupt or truncated archive: zip file version 8.4")


@pytest.mark.parametrize("edit,fragment,both_readers", [b[1:] for b in FIXED_BUGS], ids=[b[0] for b in FIXED_BUGS])
def test_wrongly_typed_manifest_values_are_documented_errors(real_archive, edit, fragment, both_readers):
    _refused(_rewritten(real_archive, edit), fragment, None if both_readers else real_archive)


PY_PART = st.text(alphabet=st.characters(blacklist_characters="/\\~:\x00", blacklist_categories=("Cs",)),
                  max_size=12)


@FAST
@given(form=st.sampled_from(["bare", "file", "module"]), a=PY_PART, b=PY_PART)
def test_py_model_specs_raise_only_documented_errors(scratch_cwd, form, a, b):
    """Malformed and unresolvable ``py:`` specs. Only names that cannot import anything real are
    generated (a random ``py:os:...`` would run arbitrary library code)."""
    spec = {"bare": f"py:{a}", "file": f"py:{a}.py:{b}", "module": f"py:sk_no_such_pkg_{a}:{b}"}[form]
    assume(".." not in spec)
    from sparsekit.models import build_model

    expect_documented(build_model, spec, {}, input_shape=(3,), num_classes=2)
