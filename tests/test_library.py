import subprocess
import sys


def test_the_library_imports_no_orchestration():
    code = (
        "import sys, layertime.spec, layertime.plan, layertime.encoder, layertime.phases.plain, layertime.phases.gpu, layertime.records, layertime.runroot, layertime.tables, "
        "layertime.bridge, layertime.cli, layertime.report, layertime.report.figures, layertime.measure, layertime.metrics, "
        "layertime.costs, layertime.pool, layertime.memory\n"
        "bad = [m for m in ('prefect', 'dask', 'distributed', 'dask_jobqueue') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
