"""``binarize ablate``: plan validation before any training, isolated members, resumable runs."""

import json

import pytest
import yaml

from binarize.ablate import load_plan, plan_dir, run_plan
from binarize.errors import BinarizeError

from tests.test_cli_errors import assert_one_line_error, run_cli


def write_plan(tmp_path, **plan):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


BASE = dict(name="t", tokens=2048, recipe="binaryllm",
            set=dict(seq_len=64, batch_tokens=256, micro_batch=4, chunks=4, bai_steps=2, bai_batch_tokens=128,
                     calib_sequences=4, lr=1e-3))


@pytest.mark.parametrize("name", sorted(p.stem for p in plan_dir().glob("*.yaml")))
def test_shipped_plans_validate(name):
    plan = load_plan(name)
    assert len(plan.members) >= 2 and plan.tokens > 0


@pytest.mark.parametrize("change,needle", [
    (dict(runs=[{"name": "a", "recipe": "nope"}]), "run 'a': unknown recipe 'nope'"),
    (dict(runs=[{"name": "a", "set": {"bogus_key": 1}}]), "unknown recipe key 'bogus_key'"),
    (dict(runs=[{"name": "a", "recipe": "continual-16to158", "set": {"switch_at": 50}}]), "nothing would be trained"),
    (dict(runs=[{"name": "a", "recipe": "bitnet-b158-absmean", "set": {"act_bits": 4}}]), "act_bits"),
    (dict(runs=[{"name": "a"}, {"name": "a"}]), "unique"),
    (dict(runs=[]), "non-empty"),
    (dict(runs=[{"name": "a"}], extra=1), "unknown key(s) extra"),
    (dict(runs=[{"name": "a"}], from_scratch="tiny"), "BaI has nothing"),
])
def test_bad_plans_fail_before_training(tmp_path, capsys, change, needle):
    path = write_plan(tmp_path, **{**BASE, **change})
    with pytest.raises(BinarizeError, match=None) as exc:
        load_plan(str(path))
    assert needle in str(exc.value)
    code, err = run_cli(capsys, "ablate", str(path), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_members_run_isolated_and_resume(tiny_model_dir, small_text, tmp_path):
    plan_path = write_plan(tmp_path, **BASE, model=str(tiny_model_dir),
                           eval=dict(datasets="wikitext2", seq_len=64, limit=2),
                           runs=[{"name": "ok", "set": {"data": str(small_text)}},
                                 {"name": "broken", "set": {"data": str(tmp_path / "missing.txt")}},
                                 {"name": "sa-only", "set": {"data": str(small_text), "scaling": "analytic"},
                                  "tokens": 3072, "series": "sa"}])
    plan = load_plan(str(plan_path))
    out = tmp_path / "out"
    lines = []
    results = run_plan(plan, out, echo=lines.append)
    status = {r["name"]: r["status"] for r in results}
    assert status == {"ok": "ok", "broken": "failed", "sa-only": "ok"}  # the crash did not stop the next member
    broken = next(r for r in results if r["name"] == "broken")
    assert "missing.txt" in broken["error"]
    ok = next(r for r in results if r["name"] == "ok")
    run = json.loads((out / "runs" / "ok" / "run.json").read_text())
    assert ok["tokens"] == run["tokens"]["trained"] == 2048
    assert ok["final_loss"] == pytest.approx(run["steps"][-1]["loss"])  # 8 steps: the last tenth is one step
    assert ok["ppl"]["wikitext2"] > 1
    table = (out / "table.md").read_text()
    assert "| ok | binaryllm |" in table and "failed: convert exit 2" in table and "scaling=analytic" in table
    assert (out / "plot.png").stat().st_size > 10_000
    sa = next(r for r in results if r["name"] == "sa-only")  # a member's own budget and its series
    assert sa["tokens"] == 3072 and sa["series"] == "sa" and ok["series"] is None
    assert (out / "quality.png").stat().st_size > 10_000
    # a second call skips finished members and retries the failed one
    lines.clear()
    again = run_plan(plan, out, echo=lines.append)
    assert "[ok] done earlier" in lines and "[sa-only] done earlier" in lines
    assert any(line.startswith("[broken] converting") for line in lines)
    assert [r["ppl"] for r in again if r["status"] == "ok"] == [r["ppl"] for r in results if r["status"] == "ok"]
    # the same out directory refuses a different budget
    plan.tokens = 4096
    with pytest.raises(BinarizeError, match="different plan"):
        run_plan(plan, out, echo=lines.append)


def test_members_that_differ_only_in_tokens_share_the_initialisation(tmp_path):
    from binarize.ablate import convert_command

    path = write_plan(tmp_path, **{**BASE, "runs": [
        {"name": "a", "tokens": 1024}, {"name": "b", "tokens": 4096}, {"name": "c", "set": {"bai_lr": 2e-3}},
        {"name": "e2e", "set": {"lr": 2e-3, "distill_alpha": 1.0}},
        {"name": "s", "recipe": "bitnet-b158-absmean", "set": {"bai": False}},
        {"name": "s2", "recipe": "bitnet-b158-absmean", "tokens": 4096, "set": {"bai": False}}]})
    plan = load_plan(str(path))
    runs = tmp_path / "runs"
    tail = {m.name: convert_command(plan, m, runs / m.name, resume=False)[-2:] for m in plan.members}
    # nothing kept yet: a, b and e2e (other end-to-end keys only) keep theirs; c (another BaI lr) and
    # the BaI-free ternary pair share nothing
    assert tail["a"][-1] == "--save-init" and tail["b"][-1] == "--save-init" and tail["e2e"][-1] == "--save-init"
    assert "--save-init" not in tail["c"] and "--init-from" not in tail["c"] + tail["s"] + tail["s2"]
    (runs / "b" / "init").mkdir(parents=True)
    (runs / "b" / "init" / "init.json").write_text("{}")
    assert convert_command(plan, plan.members[0], runs / "a", resume=False)[-2:] == ["--init-from", str(runs / "b")]
    assert convert_command(plan, plan.members[3], runs / "e2e", resume=False)[-2:] == ["--init-from", str(runs / "b")]
    planned = convert_command(plan, plan.members[1], runs / "b", resume=False, planned=True)
    assert planned[-2:] == ["--init-from", str(runs / "a")]


def test_a_folder_named_like_a_plan_or_recipe_does_not_hide_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "seed003").mkdir()  # e.g. the plan's own --out folder
    (tmp_path / "binaryllm").mkdir()
    from binarize.recipe import load_recipe

    assert load_plan("seed003").name == "seed003"
    assert load_recipe("binaryllm").name == "binaryllm"


def test_only_names_are_checked_before_anything_and_dry_run_keeps_to_them(tmp_path, capsys):
    path = write_plan(tmp_path, **{**BASE, "runs": [{"name": "a"}, {"name": "b", "tokens": 4096}]})
    out = tmp_path / "out"
    for extra in (["--dry-run"], []):
        code, err = run_cli(capsys, "ablate", str(path), "--out", str(out), "--only", "a,nosuch", *extra)
        assert_one_line_error(code, err, "--only names unknown run(s): nosuch")
        assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        from binarize.cli import main

        main(["ablate", str(path), "--out", str(out), "--only", "b", "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert exc.value.code in (0, None) and len(lines) == 1 and str(out / "runs" / "b") in lines[0]


def test_a_changed_recipe_file_is_another_plan_for_measured_members(tmp_path):
    """The members' overrides stay the same while the recipe file under them changes: a measured
    member's results are then another recipe's, named by the values that changed."""
    from binarize.ablate import merged_fingerprint, plan_fingerprint
    from binarize.recipe import recipe_dir

    recipe = tmp_path / "mine.yaml"
    text = (recipe_dir() / "binaryllm.yaml").read_text()
    recipe.write_text(text + "\nlr: 1.0e-4\n")
    path = write_plan(tmp_path, **{**BASE, "set": {k: v for k, v in BASE["set"].items() if k != "lr"},
                                   "runs": [{"name": "a", "recipe": str(recipe)}, {"name": "b"}]})
    before = plan_fingerprint(load_plan(str(path)))
    assert before["members"][0]["resolved"]["lr"] == pytest.approx(1e-4)
    recipe.write_text(text + "\nlr: 3.0e-4\n")
    after = plan_fingerprint(load_plan(str(path)))
    assert merged_fingerprint(before, after, tmp_path) == after  # nothing measured yet: the change is taken
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.json").write_text('{"status": "ok"}')
    with pytest.raises(BinarizeError, match=r"member.s. a changed \(recipe values lr 0.0001 -> 0.0003\)"):
        merged_fingerprint(before, after, tmp_path)
    # a fingerprint written before values were recorded, or a key added since, compares what both hold
    legacy = {**before, "members": [{k: v for k, v in m.items() if k != "resolved"} for m in before["members"]]}
    assert merged_fingerprint(legacy, after, tmp_path) == after
    grown = {**after, "members": [m | {"resolved": m["resolved"] | {"new_key": 1}} for m in after["members"]]}
    assert merged_fingerprint(after, grown, tmp_path) == grown


def test_a_plan_may_gain_members_but_not_change_measured_ones(tmp_path):
    from binarize.ablate import merged_fingerprint

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "b.json").write_text('{"status": "ok"}')  # b was measured, a and c were not
    a, b = {"name": "a", "tokens": 1}, {"name": "b", "tokens": 2}
    old = {"name": "p", "tokens": 1024, "members": [a, b]}
    grown = merged_fingerprint(old, {"name": "p", "tokens": 1024, "members": [a, b, {"name": "c", "tokens": 3}]},
                               tmp_path)
    assert [m["name"] for m in grown["members"]] == ["a", "b", "c"]
    dropped = merged_fingerprint(grown, {"name": "p", "tokens": 1024, "members": [a]}, tmp_path)
    assert [m["name"] for m in dropped["members"]] == ["a", "b", "c"]  # b and c stay remembered
    with pytest.raises(BinarizeError, match="member.s. b changed"):
        merged_fingerprint(dropped, {"name": "p", "tokens": 1024, "members": [a, {"name": "b", "tokens": 5}]}, tmp_path)
    with pytest.raises(BinarizeError, match="different plan or budget"):
        merged_fingerprint(old, {"name": "p", "tokens": 2048, "members": [a, b]}, tmp_path)
    # a member with no result yet may change; the changed settings are the ones remembered
    moved = merged_fingerprint(grown, {"name": "p", "tokens": 1024, "members": [a, b, {"name": "c", "tokens": 9}]},
                               tmp_path)
    assert {m["name"]: m["tokens"] for m in moved["members"]} == {"a": 1, "b": 2, "c": 9}
