"""A GPU worker's checkpoint tasks (tasks/units.py over phases.gpu.checkpoint_gpu_work): the next model
loads while the current computes."""

import threading
import time
from types import SimpleNamespace

from layertime.phases import embed, record
from layertime.phases import measure as measuring
from tasks import units

LOAD_S, EMBED_S = 0.3, 0.2


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

    def load(spec, ckpt, blocks, settings, device=None):
        trace.add("load", ckpt.revision)
        time.sleep(LOAD_S)  # reading weights from storage: no GPU held
        trace.add("loaded", ckpt.revision)
        return _FakeEncoder(ckpt.revision, trace)

    def embed_unit(encoder, ctx, ckpt, task, texts, blocks):
        trace.add(f"embed {task}", ckpt.revision)
        time.sleep(EMBED_S)
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
        t.join(timeout=30)

    assert {c: d.embeddings for c, d in done.items()} == {
        c: {t: f"/embeddings/{c}/{t}" for t in ("T1", "T2")} for c in ("A", "B")
    }
    first, second = sorted("AB", key=lambda c: trace.time_of("embed T1", c))
    # the second checkpoint's load ended before the first one's forward passes did: it overlapped them
    assert trace.time_of("loaded", second) < trace.time_of("embedded T2", first)
    # forward passes never overlap, and one model at a time was on the device
    computes = sorted((trace.time_of(f"embed {t}", c), trace.time_of(f"embedded {t}", c))
                      for c in "AB" for t in ("T1", "T2"))  # fmt: skip
    assert all(
        end <= next_start for (_, end), (next_start, _) in zip(computes[:-1], computes[1:], strict=True)
    )
    assert trace.most_on_device == 1 and trace.on_device == 0
