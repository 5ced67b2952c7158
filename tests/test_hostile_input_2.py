"""The fuzz corpus, round two (issue 26): deep nesting wherever JSON is parsed, numbers Python
refuses, outputs that cannot be written, values that make no sense, listings with one bad
entry, checkpoint meta that lies, a refused pickle. Each case: one `error:` line naming the
place, exit 2 (registry errors: 1), no traceback, before the work.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from jobs.main import app
from seminar.data.clicks import make_click_table, write_click_table
from seminar.untrusted import UntrustedJSONError, json_depth, parse_json
from test_hostile_input import problem

runner = CliRunner()
TINY = ["data.synthetic.num_train=8", "data.synthetic.num_val=4", "data.synthetic.image_size=32",
        "data.crop_size=[32, 32]", "optim.batch_size=4", "optim.steps=2", "students.0.decoder_channels=16",
        "students.1.decoder_channels=16", "resources.loader_workers=0"]


@pytest.mark.parametrize("text, words", [
    ("[" * 100_000 + "]" * 100_000, ["body", "100000 levels deep"]),
    ('{"a": ' * 70 + "1" + "}" * 70, ["body", "70 levels deep"]),
    ('{"n": 1' + "0" * 5000 + "}", ["body", "more than 4300 digits"]),
    ('{"a": [1, 2', ["body", "not valid JSON", "line 1"]),
    (b'{"a": "\xff"}', ["body", "not UTF-8"]),
])
def test_untrusted_json_is_refused_in_one_line(text, words):
    with pytest.raises(UntrustedJSONError) as refused:
        parse_json(text, "body")
    assert all(w in str(refused.value) for w in words) and "\n" not in str(refused.value)


def test_json_depth_counts_brackets_outside_strings_only():
    assert json_depth('{"a": [1, {"b": "[[[[{{"}], "c": "\\"]"}') == 3
    assert parse_json('{"a": [[["x"]]]}', "ok") == {"a": [[["x"]]]}


def spec_cases(tmp_path):
    (tmp_path / "bigint.yaml").write_text("optim: {steps: 1" + "0" * 4400 + "}\n")
    (tmp_path / "duplicate.yaml").write_text("optim: {steps: 3}\nmethod: {w_ss: 0}\noptim: {steps: 4}\n")
    clicks = tmp_path / "clicks.json"
    clicks.write_text('{"a": [{"x": 1' + "0" * 5000 + ', "y": 1, "cls": 1, "rank": 1}]}')
    empty = tmp_path / "empty.parquet"
    write_click_table(make_click_table([], [], [], [], [], "user"), str(empty))
    camvid = ["--set", "data.dataset=camvid", "--set", "data.root=tests/data/camvid_tiny"]
    return [
        ("bigint", ["--config", str(tmp_path / "bigint.yaml")], ["bigint.yaml", "more than 4300 digits"]),
        ("duplicate_key", ["--config", str(tmp_path / "duplicate.yaml")], ["duplicate.yaml", "line 3", "'optim'"]),
        ("steps_1e30", ["--set", "optim.steps=" + "1" + "0" * 30], ["optim.steps", "less than or equal"]),
        ("num_train_1e9", ["--set", "data.synthetic.num_train=1000000000"], ["data.synthetic.num_train"]),
        ("load_scale_1e-9", ["--set", "data.load_scale=0.000000001"], ["data.load_scale", "0.05"]),
        ("scale_range_8", ["--set", "data.scale_range=[8, 8]"], ["data.scale_range", "<= 4"]),
        ("click_bigint", [*camvid, "--set", f"data.clicks={clicks}"], ["clicks.json", "more than 4300 digits"]),
        ("zero_clicks", [*camvid, "--set", f"data.clicks={empty}"], ["empty.parquet", "no clicks"]),
    ]


def test_numbers_and_values_that_make_no_sense_are_refused_before_any_work(tmp_path):
    runs = tmp_path / "runs"
    failures = []
    for name, args, words in spec_cases(tmp_path):
        wrong = problem(runner.invoke(app, ["train", "--in-process", *args, "--set", f"storage.path={runs}"]), words)
        if wrong:
            failures.append(f"{name}: {wrong}")
    assert not failures, "\n".join(failures)
    assert not runs.exists()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run of two steps (its checkpoint, its metrics.jsonl)."""
    root = tmp_path_factory.mktemp("runs")
    result = runner.invoke(app, ["train", "--in-process", *[a for s in TINY for a in ("--set", s)],
                                 "--set", f"storage.path={root}", "--set", "storage.run_name=r"])
    assert result.exit_code == 0, result.output
    return root / "r"


def test_unwritable_outputs_fail_before_the_work(run_dir):
    checkpoint = str(next(run_dir.glob("checkpoints/step_*")))
    for args, words in [
        (["evaluate", checkpoint, "--grid", "/proc/nope/grid.png"], ["--grid /proc/nope/grid.png", "cannot be written"]),
        (["runs", "plot", str(run_dir), "-o", "/proc/nope/curves.png"], ["--out /proc/nope/curves.png"]),
        (["runs", "plot", str(run_dir), "-o", str(run_dir)], ["is a directory"]),
        (["predict", checkpoint, "tests/data/voc_tiny/JPEGImages", "--out", "/proc/nope"], ["--out /proc/nope"]),
    ]:
        result = runner.invoke(app, args)
        assert problem(result, words) is None, (args, problem(result, words))
        assert "mIoU" not in result.output  # refused before evaluating


def test_checkpoint_meta_that_names_a_network_it_lacks_is_refused(run_dir, tmp_path):
    lying = tmp_path / "lying"
    shutil.copytree(next(run_dir.glob("checkpoints/step_*")), lying)
    meta = json.loads((lying / "meta.json").read_text())
    for served in ("teacher_9", "teacher_²", "nobody"):
        (lying / "meta.json").write_text(json.dumps({**meta, "served": served}))
        result = runner.invoke(app, ["evaluate", str(lying)])
        assert problem(result, [str(lying), repr(served), "not one of its 2 students' networks"]) is None, result.output


def test_init_from_weights_that_need_unpickling_is_one_line(run_dir, tmp_path):
    hostile = tmp_path / "hostile"
    shutil.copytree(next(run_dir.glob("checkpoints/step_*")), hostile)
    torch.save({"w": torch.zeros(1), "payload": tmp_path}, hostile / "student_0" / "teacher.pt")  # a Path: not weights
    result = runner.invoke(app, ["train", "--in-process", *[a for s in TINY for a in ("--set", s)],
                                 "--set", f"storage.path={tmp_path}/runs", "--set", f"students.0.init_from={hostile}"])
    assert problem(result, ["teacher.pt", "not a readable weights file"]) is None, problem(result, [])


def test_a_bad_entry_does_not_break_the_model_listing(tmp_path):
    def version(model: str, number: str, metadata: str) -> None:
        (tmp_path / model / number).mkdir(parents=True)
        (tmp_path / model / number / "metadata.json").write_text(metadata)

    good = {"files": {"meta.json": {"sha256": "0" * 64}}, "created": "2026-12-04", "metrics": {"val/miou": 0.5},
            "click_source": "simulated"}
    version("good", "1", json.dumps(good))
    version("good", "²", json.dumps(good))  # passes str.isdigit(), not int()
    version("deep", "1", '{"files": ' + "[" * 200_000 + "]" * 200_000 + "}")
    (tmp_path / ".stray").mkdir()
    listed = runner.invoke(app, ["models", "list", "--registry", str(tmp_path)])
    assert listed.exit_code == 0 and "Traceback" not in listed.output, listed.output
    assert "good" in listed.output and "0.5000" in listed.output
    assert "deep/1/metadata.json: JSON nested 200001 levels deep" in listed.output.replace("\n", "")
    assert "'.stray' is not a model name" in listed.output.replace("\n", "")
    shown = runner.invoke(app, ["models", "show", "deep", "--registry", str(tmp_path)])
    assert shown.exit_code == 1 and shown.output.startswith("error:") and "levels deep" in shown.output
    assert "Traceback" not in shown.output and len(shown.output.strip().splitlines()) == 1, shown.output


def test_a_task_host_that_rebinds_to_a_private_address_is_refused_at_connect(monkeypatch):
    """DNS rebinding: a name that resolves to a public address when checked and to loopback
    when connected. The check is made to pass (as the first answer would); the address the
    connection reached is checked again, and nothing is sent to it."""
    import http.server
    import threading

    import serving.label_studio as label_studio
    from serving.imaging import InputError

    requests_seen = []

    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests_seen.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(label_studio, "check_image_host", lambda url, label_studio_url: None)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/x.png"
        with pytest.raises(InputError, match=r"127\.0\.0\.1 is not a public address \(127\.0\.0\.1\)"):
            label_studio.fetch_image(url, None, 10**6, 5)
        assert requests_seen == []  # refused once connected, before the request was sent
        # Label Studio's own host (serving.label_studio_url) may be private
        label_studio.fetch_image("/x.png", f"http://127.0.0.1:{server.server_address[1]}", 10**6, 5)
        assert requests_seen == ["/x.png"]
    finally:
        server.shutdown()


def test_label_studio_redirects_to_private_hosts_are_refused_and_keep_no_key(monkeypatch):
    """Label Studio's own host may redirect, but not to an address a task may not name, and its
    key never travels along a redirect; the other side's words are not repeated."""
    import http.server
    import threading

    from serving.imaging import InputError
    from serving.label_studio import fetch_image

    seen = []

    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(dict(self.headers))
            target = {"/private": "http://10.0.0.7/x.png", "/same": "/secret"}.get(self.path)
            self.send_response(302 if target else 500, "internal detail 42")
            if target:
                self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "secret-key")
    try:
        with pytest.raises(InputError, match=r"http://10\.0\.0\.7/x\.png: 10\.0\.0\.7 is not a public address"):
            fetch_image("/private", url, 10**6, 5)
        assert seen[-1]["Authorization"] == "Token secret-key"
        with pytest.raises(InputError) as failed:
            fetch_image("/same", url, 10**6, 5)  # on to /secret, which answers 500
        assert str(failed.value).endswith("/same: HTTP 500") and "internal detail" not in str(failed.value)
        assert "Authorization" not in seen[-1]  # the redirected request carried no key
    finally:
        server.shutdown()
        server.server_close()


def test_one_click_cap_for_the_webhook_and_the_clicks_route():
    from serving.app import ClickBatch
    from serving.imaging import MAX_CLICKS_PER_REQUEST, InputError
    from serving.label_studio import annotation_clicks

    point = {"type": "keypointlabels", "to_name": "image", "original_width": 10, "original_height": 10,
             "value": {"x": 5, "y": 5, "keypointlabels": ["a"]}}
    payload = {"task": {"data": {"image": "/data/upload/1/x.png"}}, "annotation": {"result": [point] * 1001}}
    with pytest.raises(InputError, match="1001 key points; at most 1000") as refused:
        annotation_clicks(payload, ["background", "a"])
    assert refused.value.status == 413
    payload["annotation"]["result"] = [point] * MAX_CLICKS_PER_REQUEST
    assert len(annotation_clicks(payload, ["background", "a"])[1]) == MAX_CLICKS_PER_REQUEST
    assert any(getattr(m, "max_length", None) == MAX_CLICKS_PER_REQUEST for m in ClickBatch.model_fields["clicks"].metadata)
