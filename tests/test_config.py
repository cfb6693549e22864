import pytest

from ditmesh import ParallelConfig


def test_parse_round_trips():
    for text in ["ulysses=4,cfg=2", "pipefusion=2,pipefusion_patches=4,warmup_steps=1", "data=2,ring=2,tensor=2", "serial",
                 "ulysses=2,ulysses_head_groups=3,reorder_comms=1"]:
        config = ParallelConfig.parse(text)
        assert ParallelConfig.parse(str(config)) == config
    assert str(ParallelConfig.parse("cfg=2,ulysses=4")) == "cfg=2,ulysses=4"


def test_world_size_is_product_of_degrees():
    config = ParallelConfig(data_degree=2, cfg_degree=2, ulysses_degree=2)
    assert config.world_size == 8
    assert ParallelConfig.parse("data_degree=3").data_degree == 3
    assert ParallelConfig().world_size == 1


@pytest.mark.parametrize(
    "text, match",
    [
        ("ulysses=0", "positive integer"),
        ("ring=-2", "positive integer"),
        ("cfg=3", "cfg_degree must be 1 or 2"),
        ("ulyses=2", "unknown parallel config key 'ulyses'"),
        ("ulysses", "not key=value"),
        ("ulysses=two", "must be an integer"),
        ("ulysses=2,ulysses=4", "given twice"),
        ("warmup_steps=-1", ">= 0"),
        ("attention_backend=flash9", "use one of"),
        ("ulysses=2,ulysses_head_groups=0", "positive integer"),
        ("ulysses=2,reorder_comms=yes", "must be 1 or 0"),
    ],
)
def test_bad_values_name_the_fix(text, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig.parse(text)


def test_config_is_frozen():
    config = ParallelConfig(ulysses_degree=2)
    with pytest.raises(AttributeError):
        config.ulysses_degree = 4


def test_world_size_mismatch():
    with pytest.raises(ValueError, match="needs 8 processes but the world has 4"):
        ParallelConfig(cfg_degree=2, ulysses_degree=4).check_world_size(4)


def test_boolean_settings_parse():
    assert ParallelConfig.parse("ring=2,reorder_comms=1").reorder_comms is True
    assert ParallelConfig.parse("reorder_comms=false").reorder_comms is False
    with pytest.raises(ValueError, match="True or False"):
        ParallelConfig(ulysses_degree=2, reorder_comms=1)


@pytest.mark.parametrize("text, match", [("ring=2,ulysses_head_groups=2", "set ulysses_degree > 1 or drop it"),
                                         ("tensor=2,reorder_comms=1", "set ulysses_degree or ring_degree > 1")])
def test_settings_that_would_do_nothing_are_refused(text, match):
    from ditmesh.models.tiny import tiny_flux_transformer
    from ditmesh.parallel.validate import config_problems

    problems = config_problems(tiny_flux_transformer(num_layers=1, num_single_layers=1), ParallelConfig.parse(text))
    assert any(match in p for p in problems), problems
