"""The format registry: one entry per format, one place for method/format checks, and the library's
``convert`` exporting as the command does."""

import json

import pytest

from binarize.cli import main
from binarize.errors import BinarizeError
from binarize.formats import FORMATS, Exported, check_fit, check_options, check_recipe, export_run, get_format
from binarize.recipe import load_recipe


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_entry_resolves_its_writer(name):
    f = get_format(name)
    assert f.name == name and callable(f.write_fn())
    assert check_options(name, {}) == f.options  # defaults filled in


def test_unknown_format_and_option_are_one_error():
    with pytest.raises(BinarizeError, match="unknown packed format 'nibble'"):
        get_format("nibble")
    with pytest.raises(BinarizeError, match="takes no option --gguf-outer"):
        check_options("binary", {"gguf_outer": "q8_0"})
    with pytest.raises(BinarizeError, match="takes no option --cpu-cache"):
        check_options("gguf-tq2", {"cpu_cache": "fp32"})


def test_method_fit_is_checked_in_one_place():
    for fmt, ok in (("binary", False), ("gguf-q1", False), ("ternary2", True), ("ternary-b3", True),
                    ("gguf-tq2", True), ("bitnet", True)):
        if ok:
            check_fit("ternary", fmt, "this run")
        else:
            with pytest.raises(BinarizeError, match="no zero code"):
                check_fit("ternary", fmt, "this run")
        check_fit("binary", fmt, "this run")


def test_recipe_checks_before_training():
    with pytest.raises(BinarizeError, match="share_st"):
        check_recipe(load_recipe("binaryllm"), "gguf-tq2")
    check_recipe(load_recipe("binaryllm", {"share_st": True}), "gguf-q1")
    check_recipe(load_recipe("bitnet-b158-absmean"), "gguf-tq1")  # no BaI: St = 1 folds trivially
    check_recipe(load_recipe("bitnet-b158-absmean"), "bitnet")
    with pytest.raises(BinarizeError, match="bitnet"):
        check_recipe(load_recipe("binaryllm"), "bitnet")


def test_export_cli_refuses_an_option_the_format_does_not_take(capsys, converted_tiny_dir, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["export", str(converted_tiny_dir), "--out", str(tmp_path / "p"), "--gguf-outer", "q8_0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--gguf-outer" in err[0]
    assert not (tmp_path / "p").exists()


def test_export_run_returns_what_it_wrote(converted_tiny_dir, tmp_path):
    done = export_run(converted_tiny_dir, tmp_path / "p", "ternary-b3", cpu_cache="fp32")
    assert isinstance(done, Exported) and done.path == tmp_path / "p"
    meta = json.loads((done.path / "binarize.json").read_text())
    assert meta["packing"] == "ternary-b3" and f"{meta['bits_per_weight']:.4f}" in done.lines[0]
    assert json.loads((done.path / "config.json").read_text())["quantization_config"]["cpu_cache"] == "fp32"


def test_library_convert_exports_like_the_command(trained_tiny_dir, small_text, tmp_path):
    from binarize.train import ConvertJob, RunRecord, convert_run

    recipe = load_recipe("binaryllm", dict(seq_len=64, batch_tokens=256, bai_batch_tokens=128, bai_steps=1,
                                           calib_sequences=4, chunks=2, data=str(small_text)))
    res = convert_run(ConvertJob(str(trained_tiny_dir), 1024, tmp_path / "run", recipe, progress=False,
                                 export="ternary2"))
    assert res.exported.path == tmp_path / "run" / "packed"
    assert json.loads((res.exported.path / "binarize.json").read_text())["packing"] == "ternary2"
    back = RunRecord.read(res.path)  # run.json reads back into the same record
    assert back.to_dict() == json.loads(json.dumps(res.record.to_dict()))
    assert back.tokens.trained == 1024 and len(back.steps) == back.tokens.optimizer_steps == 4
