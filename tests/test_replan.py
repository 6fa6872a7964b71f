"""Plans per CPU: calibration chooses between the gather (rows) and gather-free (window) kernels by
measurement, measured artifacts record the CPU they were measured on, and loading one on another CPU
measures again once, then reads the cache. CPU identities are faked and timings scripted: nothing here
depends on the machine running it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from runtime_helpers import K, close, sparse_matrix

import sparsekit.runtime as rt
from sparsekit.runtime import cpu, replan, tune

pytestmark = pytest.mark.skipif(K is None, reason="no compiled kernels")

INTEL = {"vendor": "GenuineIntel", "family": "6", "model": "143", "model_name": "Intel(R) Xeon(R) Platinum 8488C",
         "machine": "x86_64", "isa": "avx512"}
ZEN4 = {"vendor": "AuthenticAMD", "family": "25", "model": "17", "model_name": "AMD EPYC 9R14 96-Core Processor",
        "machine": "x86_64", "isa": "avx512"}


def _model(seed: int = 0) -> rt.FastModel:
    rng = np.random.default_rng(seed)
    layers = [rt.CsrLayer.from_dense(sparse_matrix(rng, 300, 200, 0.1), rng.standard_normal(300).astype(np.float32),
                                     relu=True, name="fc1"),
              rt.CsrLayer.from_dense(sparse_matrix(rng, 600, 300, 0.1), None, relu=False, name="fc2")]
    return rt.FastModel(layers, (200,))


def _scripted(fast: str):
    """Timings where plans whose first layer runs ``fast`` take 1 us and every other plan 5 us."""
    return lambda _m, _x, _t, specs, _n, _c: 1e-6 if specs[0].partition("@")[0] == fast else 5e-6


def _on(monkeypatch, identity: dict[str, str]) -> None:
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: {k: identity[k] for k in ("vendor", "family", "model", "model_name")})
    monkeypatch.setattr(cpu, "kernel_isa", lambda: identity["isa"])


def _artifact(tmp_path, monkeypatch, fast: str, identity: dict[str, str]):
    """A calibrated artifact whose plan was measured on ``identity`` with ``fast`` the fastest kernel."""
    _on(monkeypatch, identity)
    model = _model()
    monkeypatch.setattr(tune, "_burst", _scripted(fast))
    tune.calibrate(model, batches=(1, 2, 64))
    model.metadata["plan_source"] = "calibrated"
    replan.record(model)
    return rt.save(model, tmp_path / "m.fast.onnx")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("SPARSEKIT_CACHE_DIR", str(d))
    return d


def test_calibration_takes_whichever_small_batch_kernel_measures_faster(monkeypatch):
    if not _model().layers[0].has_window():
        pytest.skip("this code path has no window kernel")
    for fast, want in (("rows", "rows"), ("window", "window")):
        model = _model()
        monkeypatch.setattr(tune, "_burst", _scripted(fast))
        report = tune.calibrate(model, batches=(1, 2))
        assert model.kernels_for(1) == [want, want] and model.kernels_for(2) == [want, want]
        assert {"heuristic", "other sparse", "dense"} <= set(report["1"]["median_s"])
        assert report["1"]["chosen"] == ("heuristic" if want == "window" else "other sparse")


def test_cpu_identity_reads_the_first_processor(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                    "model name\t: AMD EPYC 9B45\n\nprocessor\t: 1\nvendor_id\t: Other\n")
    monkeypatch.setattr(cpu, "CPUINFO", info)
    ident = cpu.cpu_identity()
    assert {k: ident[k] for k in ("vendor", "family", "model", "model_name")} == {
        "vendor": "AuthenticAMD", "family": "26", "model": "2", "model_name": "AMD EPYC 9B45"}
    assert cpu.cpu_key(ident).startswith("AuthenticAMD/26/2/") and cpu.cpu_key(ident).endswith(ident["isa"])
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "missing")
    assert cpu.cpu_identity()["vendor"] == ""  # no /proc/cpuinfo: an identity all the same


def test_an_artifact_loaded_on_its_own_cpu_keeps_its_plan(tmp_path, monkeypatch, cache):
    path = _artifact(tmp_path, monkeypatch, "rows", INTEL)
    monkeypatch.setattr(tune, "calibrate", lambda *a, **k: pytest.fail("re-measured on the same CPU"))
    model = rt.load(path)
    assert model.replanned is None and model.kernels_for(1) == ["rows", "rows"]
    assert json.loads(model.metadata["plan_cpu"])["vendor"] == "GenuineIntel"
    assert not cache.exists()


def test_an_artifact_loaded_on_another_cpu_is_replanned_once_then_cached(tmp_path, monkeypatch, cache):
    path = _artifact(tmp_path, monkeypatch, "rows", INTEL)  # gathers measured fast on the Intel machine
    _on(monkeypatch, ZEN4)
    monkeypatch.setattr(tune, "_burst", _scripted("window"))  # and slow here
    model = rt.load(path)
    want = ["window", "window"] if model.layers[0].has_window() else ["rows", "rows"]
    assert model.kernels_for(1) == want
    assert model.replanned["cached"] is False and model.replanned["written"] is True
    assert model.metadata["plan_cpu_key"] == cpu.cpu_key(cpu.cpu_identity())
    assert model.metadata["plan_source"] == "calibrated on load"
    note = next(iter(model.notes))
    assert "Intel(R) Xeon(R) Platinum 8488C" in note and "AMD EPYC 9R14" in note and "measured now" in note
    files = list((cache / "plans").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["cpu"]["vendor"] == "AuthenticAMD"
    x = np.random.default_rng(1).standard_normal((1, 200)).astype(np.float32)
    close(model.run(x), model.layers[1].reference(model.layers[0].reference(x)))
    # the second load on this CPU reads the cache
    monkeypatch.setattr(tune, "calibrate", lambda *a, **k: pytest.fail("measured again despite the cache"))
    again = rt.load(path)
    assert again.replanned["cached"] is True and again.kernels_for(1) == want
    assert [layer.plan for layer in again.layers] == [layer.plan for layer in model.layers]
    # another thread count is another plan
    monkeypatch.undo()
    monkeypatch.setenv("SPARSEKIT_CACHE_DIR", str(cache))
    _on(monkeypatch, ZEN4)
    monkeypatch.setattr(tune, "_burst", _scripted("window"))
    assert rt.load(path, threads=2).replanned["cached"] is False


def test_a_corrupt_cache_entry_is_measured_again(tmp_path, monkeypatch, cache):
    path = _artifact(tmp_path, monkeypatch, "rows", INTEL)
    _on(monkeypatch, ZEN4)
    monkeypatch.setattr(tune, "_burst", _scripted("window"))
    rt.load(path)
    entry = next((cache / "plans").glob("*.json"))
    for bad in ("not json", json.dumps({"version": 1, "plans": [{"1": "nonsense"}, {"1": "rows"}]}),
                json.dumps({"version": 1, "plans": [{"1": "rows"}]}), json.dumps([1, 2])):
        entry.write_text(bad)
        model = rt.load(path)
        assert model.replanned["cached"] is False
        assert json.loads(entry.read_text())["version"] == replan.CACHE_VERSION  # rewritten


def test_replanning_can_be_turned_off_and_an_unwritable_cache_only_costs_the_cache(tmp_path, monkeypatch, cache):
    path = _artifact(tmp_path, monkeypatch, "rows", INTEL)
    _on(monkeypatch, ZEN4)
    monkeypatch.setattr(tune, "_burst", _scripted("window"))
    monkeypatch.setenv("SPARSEKIT_REPLAN", "0")
    kept = rt.load(path)
    assert kept.replanned is None and kept.kernels_for(1) == ["rows", "rows"]
    assert rt.load(path, replan=False).replanned is None
    monkeypatch.delenv("SPARSEKIT_REPLAN")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("SPARSEKIT_CACHE_DIR", str(blocker))
    model = rt.load(path)
    assert model.replanned["written"] is False and "not kept" in next(iter(model.notes))


def test_heuristic_and_unrecorded_artifacts(tmp_path, monkeypatch, cache):
    _on(monkeypatch, ZEN4)
    model = _model()  # no measured plan: the heuristic decides on whatever CPU runs it
    path = rt.save(model, tmp_path / "h.fast.onnx")
    monkeypatch.setattr(tune, "calibrate", lambda *a, **k: pytest.fail("a heuristic plan re-measured"))
    assert rt.load(path).replanned is None
    # a measured plan from before artifacts recorded their CPU is measured again
    monkeypatch.undo()
    monkeypatch.setenv("SPARSEKIT_CACHE_DIR", str(cache))
    _on(monkeypatch, ZEN4)
    monkeypatch.setattr(tune, "_burst", _scripted("rows"))
    model = _model()
    tune.calibrate(model, batches=(1,))
    model.metadata["plan_source"] = "calibrated"
    loaded = rt.load(rt.save(model, tmp_path / "old.fast.onnx"))
    assert loaded.replanned is not None and "an unrecorded CPU" in next(iter(loaded.notes))


def test_the_exporter_records_the_cpu_it_measured_on(tmp_path, monkeypatch, cache):
    from runtime_helpers import dense_mlp
    from sparsekit.exporters.fast import write_model

    _on(monkeypatch, ZEN4)
    report = write_model(dense_mlp(np.random.default_rng(3), [64, 128, 10], 0.2), tmp_path / "a.fast.onnx")
    assert report["plan_source"] == "calibrated"
    meta = rt.load(tmp_path / "a.fast.onnx").metadata
    assert meta["plan_cpu_key"] == cpu.cpu_key(ZEN4)
    assert json.loads(meta["plan_cpu"])["model_name"] == ZEN4["model_name"]
    write_model(dense_mlp(np.random.default_rng(3), [64, 128, 10], 0.2), tmp_path / "h.fast.onnx", calibrate=False)
    assert "plan_cpu_key" not in rt.load(tmp_path / "h.fast.onnx").metadata


def test_a_whole_graph_artifact_is_replanned_step_by_step(tmp_path, monkeypatch, cache):
    from sparsekit.exporters.fast_graph import pack_graph
    from test_fast_graph import _ffn

    from sparsekit.runtime.graph_model import GraphModel

    _on(monkeypatch, INTEL)
    packed = pack_graph(_ffn(np.random.default_rng(3))[0])
    model = GraphModel(packed.proto, packed.layers, metadata={"plan_source": "calibrated"})
    for layer in model.layers:
        layer.plan = {1: "rows", 64: "panel"}
    replan.record(model)
    path = rt.save(model, tmp_path / "g.fast.onnx")
    _on(monkeypatch, ZEN4)
    calls = []
    monkeypatch.setattr(tune, "calibrate", lambda part, **kw: calls.append((len(part.layers), kw["batches"])))
    loaded = rt.load(path)
    # each sparse step on its own, at the recorded batch sizes: fc1 and fc2 run as one chain (fc2 alone reads
    # fc1's output), so they are calibrated together
    assert calls == [(2, [1, 64])]
    assert loaded.replanned["cached"] is False and loaded.metadata["plan_cpu_key"] == cpu.cpu_key(ZEN4)
