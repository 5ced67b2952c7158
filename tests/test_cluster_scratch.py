import json
import time

from test_cluster import RecordReports, read_reports, tiny_spec
from cluster import run_training
import sys, ray
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class TimedReports(RecordReports):
    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps({"t": time.time(), "step": metrics[0]["step"], "ck": bool(checkpoint),
                                "st": [m.get("s0/step_time", m.get("s1/step_time")) for m in metrics]}) + "\n")


def test_timing(ray_session, tmp_path):
    for i in range(2):
        t0 = time.time()
        log = tmp_path / f"r{i}.jsonl"
        run_training(tiny_spec(tmp_path / "runs", 4, 2), address=ray_session.address, callbacks=[TimedReports(log)])
        t1 = time.time()
        for r in read_reports(log):
            print(round(r["t"] - t0, 1), r["step"], r["ck"], r["st"])
        print("total", t1 - t0)
