"""A GPU worker's checkpoint tasks (tasks/units.py over phases.gpu.checkpoint_gpu_work): the next model
loads while the current computes. Proved by waiting on events, not by sleeps: the first checkpoint's
forward passes wait for the second checkpoint's load to end, which they can only see if that load
does not wait for them."""

import os
import threading
import time
from types import SimpleNamespace

from layertime.phases import embed, record
from layertime.phases import measure as measuring
from tasks import units

OVERLAP_WITHIN_S = 60  # a load that waits for the other checkpoint's compute never ends in time


class _Trace:
    """What the fake model loads and forward passes did, in order, and how many models were on the device."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str]] = []
        self.on_device = self.most_on_device = 0
        self.lock = threading.Lock()

    def add(self, what: str, ckpt: str) -> None:
        with self.lock:
            self.events.append((time.monotonic(), what, ckpt))

    def time_of(self, what: str, ckpt: str) -> float:
        return next(t for t, w, c in self.events if (w, c) == (what, ckpt))


class _FakeEncoder:
    def __init__(self, ckpt: str, trace: _Trace) -> None:
        self.ckpt, self.trace = ckpt, trace

    def to_device(self) -> None:
        with self.trace.lock:
            self.trace.on_device += 1
            self.trace.most_on_device = max(self.trace.most_on_device, self.trace.on_device)

    def __del__(self) -> None:
        with self.trace.lock:
            self.trace.on_device -= 1


def _work(ckpt: str, tasks: list[str]) -> SimpleNamespace:
    spec = SimpleNamespace(aggregation="rule-a", hf_cache=None, run_root="/run", store=None)
    checkpoint = SimpleNamespace(model="m", revision=ckpt, commit=None)
    unit = [SimpleNamespace(task=t) for t in tasks]
    plan = SimpleNamespace(spec=spec, blocks=[1])
    ctx = SimpleNamespace(plan=plan, spec=spec, run=SimpleNamespace(texts="/run/texts"), settings=None)
    return SimpleNamespace(ctx=ctx, checkpoint=checkpoint, units=tuple(unit), measure=False, label=ckpt)


def test_a_worker_loads_the_next_checkpoint_while_the_current_one_computes(monkeypatch):
    trace = _Trace()
    loaded = {c: threading.Event() for c in "AB"}
    overlapped: list[bool] = []

    def load(spec, ckpt, blocks, settings, device=None):
        trace.add("load", ckpt.revision)
        trace.add("loaded", ckpt.revision)
        loaded[ckpt.revision].set()
        return _FakeEncoder(ckpt.revision, trace)

    def embed_unit(encoder, ctx, ckpt, task, texts, blocks):
        trace.add(f"embed {task}", ckpt.revision)
        # Computing, with the GPU held: the other checkpoint's load must be able to end meanwhile.
        overlapped.append(loaded["B" if ckpt.revision == "A" else "A"].wait(OVERLAP_WITHIN_S))
        trace.add(f"embedded {task}", ckpt.revision)
        return f"/embeddings/{ckpt.revision}/{task}"

    monkeypatch.setattr(measuring, "gpu_blocks", lambda plan: [1])
    monkeypatch.setattr(embed, "load_encoder", load)
    monkeypatch.setattr(record, "task_texts", lambda *a: SimpleNamespace(texts=["a"]))
    monkeypatch.setattr(embed, "embed_unit", embed_unit)
    done = {}
    threads = [threading.Thread(target=lambda c=c: done.update({c: units._gpu(_work(c, ["T1", "T2"]))}))
               for c in ("A", "B")]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * OVERLAP_WITHIN_S + 30)

    assert {c: d.embeddings for c, d in done.items()} == {
        c: {t: f"/embeddings/{c}/{t}" for t in ("T1", "T2")} for c in ("A", "B")
    }
    # each checkpoint's forward passes saw the other's load end: no load waited for the other's compute
    assert overlapped == [True] * 4, overlapped
    # forward passes never overlap, and one model at a time was on the device
    computes = sorted((trace.time_of(f"embed {t}", c), trace.time_of(f"embedded {t}", c))
                      for c in "AB" for t in ("T1", "T2"))  # fmt: skip
    assert all(
        end <= next_start for (_, end), (next_start, _) in zip(computes[:-1], computes[1:], strict=True)
    )
    assert trace.most_on_device == 1 and trace.on_device == 0


def test_flow_runs_of_one_process_share_a_kept_pool_of_their_size_and_no_other():
    size = 1 + (os.cpu_count() or 1)  # not the size the session's own warm pool keeps
    before = dict(units._KEPT)
    with units.keep_scoring_processes(size) as kept:
        for _ in range(2):  # two flow runs, one after the other
            with units.scoring_pool(size):
                assert units._POOL[-1] is kept  # scored in the kept processes...
            assert not kept._closed  # ...which outlive the flow run
        with units.scoring_pool(size + 1):  # another size: a pool of its own, closed with its flow run
            own = units._POOL[-1]
            assert own is not kept and own.processes == size + 1
        assert own._closed and not kept._closed and kept not in units._POOL
    assert kept._closed and units._KEPT == before
