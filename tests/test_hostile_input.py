"""The fuzz corpus: hostile specs, overrides and click files, generated here (no binaries).

Every case must end in `error:` lines that name the file, the field, the line or the
click, exit 2, before any work (no run directory), and never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from typer.testing import CliRunner

from jobs.main import app
from seminar.data.clicks import make_click_table, write_click_table

runner = CliRunner()


def problem(result, words: list[str]) -> str | None:
    """What is wrong with how a command refused hostile input (None: exit 2, `error:` lines
    naming every word, no traceback, short)."""
    out = result.output
    if (result.exit_code == 2 and out.lstrip().startswith("error:") and "Traceback" not in out
            and all(w in out.replace("\n", "") for w in words) and len(out) < 2000):
        return None
    return f"exit {result.exit_code}: {out[:400]!r} {result.exception!r}"

ALIAS_BOMB = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdef", "bcdefg")])


def spec_cases(tmp_path):
    """(name, arguments to `seminar train --in-process`, words the error must contain)."""
    files = {
        "not_utf8.yaml": b"optim:\n  steps: \xff\xfe 3\n",
        "deep.yaml": ("a: " + "[" * 50_000 + "]" * 50_000 + "\n").encode(),
        "alias_bomb.yaml": ALIAS_BOMB.encode(),
        "not_a_mapping.yaml": b"- 1\n- 2\n",
        "bad_yaml.yaml": b"optim: {steps: 3\n",
        "huge.yaml": b"# " + b"x" * (2 << 20) + b"\n",
        "unknown_field.yaml": b"optim: {stepz: 3}\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    f = lambda name: ["--config", str(tmp_path / name)]  # noqa: E731
    return [
        ("not_utf8", f("not_utf8.yaml"), ["not_utf8.yaml", "line 2", "not UTF-8"]),
        ("deep", f("deep.yaml"), ["deep.yaml", "nested deeper"]),
        ("alias_bomb", f("alias_bomb.yaml"), ["alias_bomb.yaml", "aliases"]),
        ("not_a_mapping", f("not_a_mapping.yaml"), ["not_a_mapping.yaml", "mapping"]),
        ("bad_yaml", f("bad_yaml.yaml"), ["bad_yaml.yaml", "not valid YAML", "line"]),
        ("huge", f("huge.yaml"), ["huge.yaml", "bytes"]),
        ("unknown_field", f("unknown_field.yaml"), ["optim.stepz", "unknown field", "did you mean 'steps'"]),
        ("unknown_nested_field", ["--set", "students.0.augment.hu=0.1"], ["students.0.augment.hu", "'hue'"]),
        ("missing_file", f("nope.yaml"), ["nope.yaml", "not found"]),
        ("index_past_end", ["--set", "students.5.seed=1"], ["students.5", "no such item"]),
        ("index_not_a_number", ["--set", "students.x.seed=1"], ["students.x", "no such item"]),
        ("index_negative", ["--set", "students.-1.seed=1"], ["students.-1", "no such item"]),
        ("inside_a_value", ["--set", "optim.lr.x=1"], ["optim.lr", "number"]),
        ("no_equals", ["--set", "optim.steps"], ["optim.steps", "key=value"]),
        ("infinite", ["--set", "optim.poly_power=.inf"], ["optim.poly_power", "finite"]),
        ("nan", ["--set", "optim.lr=.nan"], ["optim.lr", "finite"]),
        ("alias_in_set", ["--set", "optim.steps=&a [*a]"], ["optim.steps", "aliases"]),
        ("unknown_model", ["--set", "students.0.model=resnet9000"], ["students.0.model", "resnet9000"]),
        ("negative_steps", ["--set", "optim.steps=-3"], ["optim.steps"]),
        ("storage_is_a_file", ["--set", "storage.path=/etc/passwd"], ["storage.path", "/etc/passwd", "not writable"]),
        ("storage_unwritable", ["--set", "storage.path=/proc/nope"], ["storage.path", "/proc/nope", "not writable"]),
        ("missing_data_root", ["--set", "data.dataset=camvid", "--set", f"data.root={tmp_path}/none"],
         ["data.root", "no such directory"]),
        ("missing_clicks", ["--set", "data.dataset=voc", "--set", f"data.root={tmp_path}",
                            "--set", f"data.clicks={tmp_path}/none.json"], ["data.clicks", "no such file"]),
    ]


def test_hostile_specs_fail_in_one_line_each_before_any_work(tmp_path):
    runs = tmp_path / "runs"
    failures = []
    for name, args, words in spec_cases(tmp_path):
        storage = [] if any("storage.path" in a for a in args) else ["--set", f"storage.path={runs}"]
        wrong = problem(runner.invoke(app, ["train", "--in-process", *args, *storage]), words)
        if wrong:
            failures.append(f"{name}: {wrong}")
    assert not failures, "\n".join(failures)
    assert not runs.exists()  # nothing trained, nothing written


def _json(tmp_path, name, payload):
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return str(path)


def click_cases(tmp_path):
    one = {"x": 10.0, "y": 12.0, "cls": 1, "rank": 1}
    table = make_click_table(["a", "a"], [1.0, 2.0], [1.0, 2.0], [1, 2], [1, 1], "user")
    nan_path = tmp_path / "nan.parquet"
    write_click_table(table.set_column(1, "x", pa.array([1.0, np.nan], pa.float32())), str(nan_path))
    meta_path = tmp_path / "bad_meta.parquet"
    pq.write_table(table.replace_schema_metadata({b"empty_image_ids": b"{not json"}), meta_path)
    wide_path = tmp_path / "wide_cls.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "x": [1.0], "y": [1.0], "cls": pa.array([40000], pa.int64())}),
                   wide_path)
    big_path = tmp_path / "big_cls.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "x": [1.0], "y": [1.0], "cls": pa.array([300], pa.int64())}),
                   big_path)
    surrogate = _json(tmp_path, "surrogate.json", '{"\\ud800": [{"x": 1, "y": 1, "cls": 1, "rank": 1}]}')
    not_utf8 = tmp_path / "latin1.json"
    not_utf8.write_bytes('{"caf\xe9": []}'.encode("latin-1"))
    return [
        ("cls_overflow", _json(tmp_path, "c1.json", {"a": [{**one, "cls": 40000}]}), ["'a'", "click 0", "'cls'", "40000"]),
        ("cls_huge", _json(tmp_path, "c2.json", {"a": [{**one, "cls": 1e10}]}), ["'cls'", "outside"]),
        ("cls_negative", _json(tmp_path, "c3.json", {"a": [one, {**one, "cls": -1}]}), ["click 1", "'cls'"]),
        ("rank_overflow", _json(tmp_path, "r.json", {"a": [{**one, "rank": 1e6}]}), ["'rank'", "outside"]),
        ("x_huge", _json(tmp_path, "x.json", {"a": [{**one, "x": 1e308}]}), ["'x'", "outside"]),
        ("x_nan", _json(tmp_path, "n.json", '{"a": [{"x": NaN, "y": 1, "cls": 1, "rank": 1}]}'), ["'x'", "number"]),
        ("x_string", _json(tmp_path, "s.json", {"a": [{**one, "x": "3"}]}), ["'x'", "number"]),
        ("x_bool", _json(tmp_path, "b.json", {"a": [{**one, "x": True}]}), ["'x'", "number"]),
        ("missing_field", _json(tmp_path, "m.json", {"a": [{"x": 1, "y": 1, "cls": 1}]}), ["'rank'", "missing"]),
        ("image_twice", _json(tmp_path, "twice.json", '{"a": [], "b": [], "a": []}'), ["image 'a'", "twice"]),
        ("deep", _json(tmp_path, "deep.json", "[" * 100_000 + "]" * 100_000), ["deep.json", "deep"]),
        ("not_json", _json(tmp_path, "broken.json", '{"a": ['), ["broken.json", "not valid JSON"]),
        ("not_an_object", _json(tmp_path, "list.json", [1, 2]), ["list.json", "object"]),
        ("clicks_not_a_list", _json(tmp_path, "nl.json", {"a": 3}), ["image 'a'", "list"]),
        ("surrogate_id", surrogate, ["surrogate.json", "not printable"]),
        ("not_utf8", str(not_utf8), ["latin1.json", "not UTF-8"]),
        ("parquet_nan", str(nan_path), ["nan.parquet", "image 'a'", "click 1", "'x'"]),
        ("parquet_metadata", str(meta_path), ["bad_meta.parquet", "empty_image_ids"]),
        ("parquet_cls_wide", str(wide_path), ["wide_cls.parquet", "'cls'"]),
        ("parquet_cls_range", str(big_path), ["big_cls.parquet", "'cls'", "300"]),
        ("parquet_garbage", _json(tmp_path, "garbage.parquet", "PAR1 not really"), ["garbage.parquet", "Parquet"]),
        ("unknown_type", _json(tmp_path, "clicks.txt", "x"), ["clicks.txt", "unknown click file type"]),
    ]


def test_hostile_click_files_are_named_errors(tmp_path):
    failures = []
    for name, path, words in click_cases(tmp_path):
        wrong = problem(runner.invoke(app, ["data", "inspect", path]), words)
        if wrong:
            failures.append(f"{name}: {wrong}")
    assert not failures, "\n".join(failures)


def test_broken_checkpoints_are_named_errors(tmp_path, monkeypatch):
    from seminar.config import load_spec
    from seminar.engine import write_initial_checkpoint

    good = tmp_path / "good"
    write_initial_checkpoint(str(good), load_spec(None, ["data.synthetic.num_train=8", "data.synthetic.num_val=4"]))
    cases = {}
    for name, edit in {
        "meta_not_json": lambda d: (d / "meta.json").write_text("{not json"),
        "meta_not_utf8": lambda d: (d / "meta.json").write_bytes(b"\xff\xfe"),
        "meta_empty_object": lambda d: (d / "meta.json").write_text("{}"),
        "teacher_truncated": lambda d: (d / "student_0" / "teacher.pt").write_bytes(
            (d / "student_0" / "teacher.pt").read_bytes()[:1000]),
        "teacher_random": lambda d: (d / "student_0" / "teacher.pt").write_bytes(np.random.default_rng(0).bytes(4096)),
        "teacher_missing": lambda d: (d / "student_0" / "teacher.pt").unlink(),
        # weights that need arbitrary unpickling: refused (weights_only), never executed
        "teacher_pickle": lambda d: torch.save({"w": torch.zeros(1), "payload": Path("x")},
                                               d / "student_0" / "teacher.pt"),
    }.items():
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        cases[name] = d
    # exported graphs (`seminar models export`): not ONNX, cut short, not ours, metadata not JSON
    import onnx
    from onnx import TensorProto, helper

    def graph(metadata: dict[str, str] | None) -> bytes:
        tensor = helper.make_tensor_value_info
        model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["image"], ["probs"])], "g",
                                                    [tensor("image", TensorProto.FLOAT, None)],
                                                    [tensor("probs", TensorProto.FLOAT, None)]))
        onnx.helper.set_model_props(model, metadata or {})
        return model.SerializeToString()

    for name, data in {"onnx_random": np.random.default_rng(1).bytes(4096),
                       "onnx_truncated": graph({"seminar": json.dumps({"version": "x" * 200})})[:60],
                       "onnx_not_ours": graph(None),
                       "onnx_metadata_not_json": graph({"seminar": "{not json"}),
                       "onnx_metadata_incomplete": graph({"seminar": json.dumps({"version": "v"})})}.items():
        cases[name] = tmp_path / f"{name}.onnx"
        cases[name].write_bytes(data)
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a checkpoint that cannot load")

    monkeypatch.setattr(ray, "init", no_ray)
    failures = []
    for (name, d), command in [(case, c) for case in cases.items() for c in ("evaluate", "serve")]:
        wrong = problem(runner.invoke(app, [command, str(d), "--which", "primary_teacher"]), [str(d)])
        if wrong:
            failures.append(f"{command} {name}: {wrong}")
    assert not failures, "\n".join(failures)


def test_broken_dataset_files_are_named_before_any_work(tmp_path):
    """A truncated photo, a mask of random bytes, an empty split: named by file, exit 2,
    before the first step (a truncated JPEG used to pass and crash training when sampled)."""
    camvid = Path(__file__).parent / "data" / "camvid_tiny"
    image = sorted((camvid / "train").iterdir())[0]
    mask = sorted((camvid / "trainannot").iterdir())[0]
    cases = {
        "truncated_image": (lambda r: (r / "train" / image.name).write_bytes(image.read_bytes()[:3000]),
                            [image.name, "does not decode"]),
        "random_mask": (lambda r: (r / "trainannot" / mask.name).write_bytes(np.random.default_rng(1).bytes(999)),
                        [mask.name, "not a readable mask"]),
        "empty_split": (lambda r: (r / "train.txt").write_text("\n"), ["train.txt", "no images"]),
        "split_not_utf8": (lambda r: (r / "val.txt").write_bytes(b"\xff\xfe"), ["val.txt", "not UTF-8"]),
    }
    failures = []
    for name, (edit, words) in cases.items():
        root = tmp_path / name
        shutil.copytree(camvid, root)
        edit(root)
        runs = tmp_path / f"runs-{name}"
        wrong = problem(runner.invoke(app, ["train", "--in-process", "--set", "data.dataset=camvid",
                                            "--set", f"data.root={root}", "--set", f"storage.path={runs}"]), words)
        if wrong or runs.exists():
            failures.append(f"{name}: {wrong or 'wrote ' + str(runs)}")
    assert not failures, "\n".join(failures)


def test_a_cluster_that_refuses_the_driver_is_one_line_naming_the_token(tmp_path, monkeypatch):
    """`seminar train --address` to a token cluster without the local auth settings was a
    ConnectionError traceback; now one line that says what to set."""
    import ray

    import cluster.trainer

    def refuse(*args, **kwargs):
        raise ConnectionError("Failed to connect to GCS at 10.0.0.5:6379: Unauthenticated")

    monkeypatch.setattr(cluster.trainer, "check_address", lambda address: None)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as a fresh driver process would be
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    result = runner.invoke(app, ["train", "--address", "10.0.0.5:6379", "--set", f"storage.path={tmp_path}/runs"])
    assert not problem(result, ["10.0.0.5:6379", "RAY_AUTH_MODE=token", "Unauthenticated"]), result.output


def test_evaluate_from_s3_that_stopped_answering_is_one_line(s3_server, s3_bucket, tmp_path, monkeypatch):
    """moto under SIGSTOP: the S3 requests time out and `seminar evaluate` says so, exit 2 (how
    long that takes is bench/fail_fast.py's figure; a hang is pytest-timeout's failure)."""
    import signal

    from seminar import storage
    from seminar.config import load_spec
    from seminar.engine import write_initial_checkpoint

    local = tmp_path / "ckpt"
    write_initial_checkpoint(str(local), load_spec(None, ["data.synthetic.num_train=8", "data.synthetic.num_val=4"]))
    uri = f"s3://{s3_bucket}/ckpt"
    storage.upload_dir(local, uri)
    monkeypatch.setenv(storage.S3_TIMEOUT_ENV, "1")
    server = s3_server.process
    os.kill(server.pid, signal.SIGSTOP)
    try:
        result = runner.invoke(app, ["evaluate", uri])
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert not problem(result, [uri]), result.output
