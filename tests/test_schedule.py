"""The learning rate of Sec. 4.2 and 3.4, iteration by iteration."""
from repro.schedule import LearningRate
from repro.spec import OptimSpec


def test_milestones_divide_by_ten_at_32k_and_48k():
    lr = LearningRate(OptimSpec())
    assert [lr.at(i) for i in (0, 31_999, 32_000, 47_999, 48_000, 63_999)] == \
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


def test_warmup_holds_0_01_until_training_error_below_80_then_switches_back():
    lr = LearningRate(OptimSpec(warmup_lr=0.01))
    assert lr.at(0) == 0.01
    assert not lr.end_warmup_if_trained(50, 85.0)
    assert lr.at(100) == 0.01
    assert lr.end_warmup_if_trained(400, 79.0)
    assert lr.warmup_ended_at == 400
    assert lr.at(401) == 0.1 and lr.at(32_000) == 0.01
    assert not lr.end_warmup_if_trained(450, 10.0)  # it ends once


def test_plateau_drops_after_patience_epochs_without_improvement():
    lr = LearningRate(OptimSpec(lr_schedule="plateau", plateau_patience=2, plateau_threshold=0.5))
    for error in (50.0, 40.0, 39.8, 39.7):  # the last two improve by less than the threshold
        lr.observe_validation(error)
    assert lr.at(0) == 0.01
    lr.observe_validation(30.0)
    assert lr.at(0) == 0.01


def test_state_round_trips():
    lr = LearningRate(OptimSpec(warmup_lr=0.01, lr_schedule="plateau"))
    lr.end_warmup_if_trained(300, 70.0)
    lr.observe_validation(40.0)
    copy = LearningRate(OptimSpec(warmup_lr=0.01, lr_schedule="plateau"))
    copy.load_state_dict(lr.state_dict())
    assert copy.state_dict() == lr.state_dict()


def test_warmup_never_raises_the_rate_above_the_schedule():
    lr = LearningRate(OptimSpec(warmup_lr=0.01))
    assert lr.at(100) == 0.01 and lr.at(48_000) == 0.001  # a milestone reached while still warming up


def test_warmup_ends_at_its_cap_when_the_error_never_falls():
    lr = LearningRate(OptimSpec(warmup_lr=0.01, warmup_max_iters=2000))
    assert not lr.end_warmup_if_trained(1950, 90.0)
    assert lr.end_warmup_if_trained(2000, 90.0)
    assert lr.warmup_capped and lr.warmup_ended_at == 2000 and lr.at(2001) == 0.1


def test_a_warmup_ended_by_the_error_is_not_capped():
    lr = LearningRate(OptimSpec(warmup_lr=0.01, warmup_max_iters=2000))
    assert lr.end_warmup_if_trained(2000, 50.0) and not lr.warmup_capped


def test_plateau_drops_stop_at_max_lr_drops_and_say_when_they_drop():
    lr = LearningRate(OptimSpec(lr_schedule="plateau", plateau_patience=1, max_lr_drops=2))
    dropped = [lr.observe_validation(50.0) for _ in range(6)]  # never improves after the first epoch
    assert dropped == [False, True, True, False, False, False]
    assert lr.plateau_drops == 2 and abs(lr.at(0) - 0.001) < 1e-15


def test_the_default_limit_is_three_drops():
    lr = LearningRate(OptimSpec(lr_schedule="plateau", plateau_patience=1))
    for _ in range(20):
        lr.observe_validation(50.0)
    assert lr.plateau_drops == 3
