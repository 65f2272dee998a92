"""The training loop's decisions in plain Python: checkpoint policy, skipped steps, validation."""

from types import SimpleNamespace

from avr_megatron.training.policy import (FINISHED, PREEMPTED, CheckpointPolicy, SkippedSteps,
                                          validation_due)


def _ckpt(**kw):
    base = dict(save_interval=0, save_final=True, export_hf=None, keep_last=2)
    return SimpleNamespace(**{**base, **kw})


def test_interval_saves():
    p = CheckpointPolicy.from_config(_ckpt(save_interval=3))
    assert [i for i in range(1, 10) if p.save_after_step(i)] == [3, 6, 9]
    never = CheckpointPolicy.from_config(_ckpt(save_interval=0))
    assert not any(never.save_after_step(i) for i in range(1, 10))


def test_end_of_run_saves_once_and_only_when_wanted():
    p = CheckpointPolicy.from_config(_ckpt(save_interval=5))
    assert p.save_at_end(7, FINISHED)  # save_final
    p.saved(10)
    assert not p.save_at_end(10, FINISHED)  # the interval save already holds iteration 10
    quiet = CheckpointPolicy.from_config(_ckpt(save_final=False))
    assert not quiet.save_at_end(7, FINISHED)
    assert quiet.save_at_end(7, PREEMPTED)  # requeue resumes from it
    exporting = CheckpointPolicy.from_config(_ckpt(save_final=False, export_hf="/out"))
    assert exporting.save_at_end(7, FINISHED) and exporting.exports(FINISHED)
    assert not exporting.exports(PREEMPTED) and not exporting.save_at_end(7, "aborted")


def test_resumed_run_does_not_save_the_checkpoint_it_resumed_from():
    p = CheckpointPolicy.from_config(_ckpt(), resumed_at=8)
    assert not p.save_at_end(8, FINISHED)  # nothing trained since (train_iters reached)
    assert p.save_at_end(9, FINISHED)
    assert CheckpointPolicy.from_config(_ckpt(), resumed_at=None).save_at_end(0, FINISHED)


def test_keep_last_zero_keeps_all():
    assert CheckpointPolicy.from_config(_ckpt(keep_last=0)).keep_last is None
    assert CheckpointPolicy.from_config(_ckpt(keep_last=3)).keep_last == 3


def test_skipped_steps_streak_total_and_abort():
    s = SkippedSteps.from_state({}, limit=2)
    s.record(False)
    assert (s.total, s.streak, s.aborts) == (1, 1, False)
    s.record(True)
    assert (s.total, s.streak) == (1, 0)
    s.record(False)
    s.record(False)
    assert s.aborts and s.state() == {"skipped_steps": 3, "nonfinite_streak": 2}
    resumed = SkippedSteps.from_state(s.state(), limit=3)
    assert (resumed.total, resumed.streak, resumed.aborts) == (3, 2, False)


def test_validation_due():
    assert [i for i in range(1, 11) if validation_due(i, 4, 10)] == [4, 8, 10]
    assert [i for i in range(1, 11) if validation_due(i, None, 10)] == [10]
    assert [i for i in range(1, 11) if validation_due(i, 0, 10)] == [10]


def test_policy_and_report_need_no_torch():
    import subprocess
    import sys

    code = ("import sys, avr_megatron.training.policy, avr_megatron.training.report; "
            "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
