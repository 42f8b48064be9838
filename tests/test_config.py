"""Config: YAML files < key=value overrides; typos, duplicates and bad values fail naming the key and place."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from largeloss.train.config import ConfigError, build_config, describe_keys, from_dict, resume_config, to_dict
from largeloss.train.losses import LossConfig
from largeloss.train.main import main as train_main


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_files_then_overrides(tmp_path):
    a = write(tmp_path / "a.yaml", "data: d\nlr: 1.0e-3\nmethod: an\ndelta_rel_table: {ll_r: 0.4, ll_cp: 0.1}\n")
    b = write(tmp_path / "b.yaml", "method: ll_cp\n")
    cfg = build_config([a, b], ["lr=0.5", "epochs=3", "global_topk=true"])
    assert (cfg.data, cfg.loss.method, cfg.lr, cfg.epochs, cfg.loss.global_topk) == ("d", "ll_cp", 0.5, 3, True)
    # delta_rel not given: taken from the dataset's table for the method
    assert cfg.loss.delta_rel == 0.1
    # the absolute variant shares LL-R's entry; its threshold parameters have no default (the paper gives none)
    assert build_config([a], ["method=ll_r_abs", "r0=2", "delta_abs=0.1"]).loss.delta_rel == 0.4
    with pytest.raises(ConfigError, match="r0 is required"):
        build_config([a], ["method=ll_r_abs"])
    assert build_config([a], ["method=ll_cp", "delta_rel=0.3"]).loss.delta_rel == 0.3
    # a method without a table entry takes LossConfig's default
    assert build_config([a], ["method=ll_ct"]).loss.delta_rel == LossConfig.delta_rel == 0.2


def test_typo_names_key_and_suggestion(tmp_path, capsys):
    a = write(tmp_path / "a.yaml", "data: d\n")
    with pytest.raises(ConfigError, match=r"command line: unknown config key 'metod' \(did you mean 'method'\?\)"):
        build_config([a], ["metod=ll_ct"])
    # through the entry point: exit code 2 and the message on stderr
    assert train_main(["--config", str(a), "metod=ll_ct"]) == 2
    assert "unknown config key 'metod'" in capsys.readouterr().err


def test_unknown_key_in_file_names_file_and_line(tmp_path):
    a = write(tmp_path / "a.yaml", "data: d\n\nbatchsize: 8\n")
    with pytest.raises(ConfigError, match=r"a\.yaml:3: unknown config key 'batchsize'"):
        build_config([a])


def test_duplicate_keys(tmp_path):
    a = write(tmp_path / "a.yaml", "data: d\nlr: 1\nlr: 2\n")
    with pytest.raises(ConfigError, match=r"a\.yaml:3: key 'lr' given twice \(first on line 2\)"):
        build_config([a])
    b = write(tmp_path / "b.yaml", "data: d\n")
    with pytest.raises(ConfigError, match="key 'lr' given twice"):
        build_config([b], ["lr=1", "lr=2"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("epochs=ten", "epochs must be an integer"),
        ("lr=fast", "lr must be a number"),
        ("deterministic=maybe", "deterministic must be true/false"),
        ("val_labels=dirty", "val_labels must be clean|observed"),
        ("train_fraction=0", r"train_fraction must be in \(0, 1\]"),
        ("noequals", "is not key=value"),
    ],
)
def test_bad_values(tmp_path, override, message):
    a = write(tmp_path / "a.yaml", "data: d\n")
    with pytest.raises(ConfigError, match=message):
        build_config([a], [override])


def test_data_integrity_keys():
    cfg = build_config([], ["data=d"])
    assert (cfg.verify, cfg.on_error) == ("size", "raise")
    cfg = build_config([], ["data=d", "verify=full", "on_error=skip"])
    assert (cfg.verify, cfg.on_error) == ("full", "skip")
    with pytest.raises(ConfigError, match=r"verify must be size\|full, got 'sha'"):
        build_config([], ["data=d", "verify=sha"])
    with pytest.raises(ConfigError, match=r"on_error must be raise\|skip, got 'ignore'"):
        build_config([], ["data=d", "on_error=ignore"])


def test_missing_data_is_an_error():
    with pytest.raises(ConfigError, match="`data`"):
        build_config([], [])


def test_round_trip_through_dict(tmp_path):
    cfg = build_config([], ["data=x", "method=ll_ct", "delta_rel_table={ll_ct: 0.25}"])
    assert cfg.loss.delta_rel == 0.25
    assert from_dict(to_dict(cfg)) == cfg
    # the config is frozen once resolved
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3


def test_typo_inside_the_delta_rel_table(tmp_path):
    a = write(tmp_path / "a.yaml", "data: d\nmethod: ll_ct\n\ndelta_rel_table: {llct: 0.9}\n")
    with pytest.raises(ConfigError, match=r"a\.yaml:4: delta_rel_table: unknown key 'llct' \(did you mean 'll_ct'\?\)"):
        build_config([a])
    b = write(tmp_path / "b.yaml", "data: d\ndelta_rel_table:\n  ll_r: 0.2\n  ll_cp: 0.1\n  llcp: 0.3\n")
    with pytest.raises(ConfigError, match=r"b\.yaml:5: delta_rel_table: unknown key 'llcp' \(did you mean 'll_cp'\?\)"):
        build_config([b])
    with pytest.raises(ConfigError, match=r"command line: delta_rel_table.ll_ct must be a number"):
        build_config([], ["data=d", "delta_rel_table={ll_ct: fast}"])


def test_loss_keys_and_choices(tmp_path):
    # every LossConfig field is a config key of the same name, reachable from a file or the command line
    a = write(tmp_path / "a.yaml", "data: d\nmethod: epr\nepr_num_pos: 1.5\n")
    cfg = build_config([a], ["wan_weight=0.3", "abs_skip_first_epoch=false"])
    assert cfg.loss == LossConfig(method="epr", epr_num_pos=1.5, wan_weight=0.3, abs_skip_first_epoch=False)
    keys = "\n".join(describe_keys())
    for f in dataclasses.fields(LossConfig):
        assert f"\n{f.name} = " in keys
    assert "method = 'an'  (full | an | iu |" in keys and "optimizer = 'adam'  (adam | sgd)" in keys
    # choices are checked by the coercion, naming the place
    with pytest.raises(ConfigError, match=r"b\.yaml:2: method must be full\|an\|.* got 'll_xx'"):
        build_config([write(tmp_path / "b.yaml", "data: d\nmethod: ll_xx\n")])
    with pytest.raises(ConfigError, match=r"command line: arch must be resnet18\|.* got 'resnet5' \(did you mean"):
        build_config([a], ["arch=resnet5"])
    with pytest.raises(ConfigError, match=r"command line: protocol 'partial:2': fraction must be in \(0, 1\]"):
        build_config([a], ["protocol=partial:2"])


def test_dataset_configs_name_the_reference_rules():
    # The paper's dataset configs use the official code's selection and the metric of the reference code:
    # Cole et al.'s (AP 0 without a positive) for the four artificial datasets, the official OpenImages one there.
    root = Path(__file__).resolve().parents[1] / "configs"
    expected = {"voc": "cole", "coco": "cole", "nuswide": "cole", "cub": "cole", "openimages": "openimages"}
    for name, convention in expected.items():
        cfg = build_config([root / f"{name}.yaml"], ["method=ll_cp"])
        assert (cfg.loss.ll_selection, cfg.map_convention) == ("official", convention), name
    # A bare config takes the official rule too (the paper's numbers come from it); the demo keeps exact_k.
    assert build_config([], ["data=d"]).loss.ll_selection == "official"
    assert build_config([root / "demo.yaml"]).loss.ll_selection == "exact_k"
    with pytest.raises(ConfigError, match=r"command line: ll_selection must be official\|exact_k, got 'exact'"):
        build_config([], ["data=d", "ll_selection=exact"])


def test_resume_of_a_run_saved_before_ll_selection(tmp_path):
    # A run directory written before ll_selection existed was trained with exact_k: resume keeps it, while a
    # saved value (or a new run) is taken as is.
    cfg = build_config([], ["data=d", "method=ll_ct"])
    saved = to_dict(cfg)
    del saved["ll_selection"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    assert resume_config(str(old), []).loss.ll_selection == "exact_k"
    new = tmp_path / "new"
    new.mkdir()
    (new / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    assert resume_config(str(new), []).loss.ll_selection == "official"
