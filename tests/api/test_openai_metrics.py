"""Our training numbers in OpenAI's names (api/openai_metrics.py), checked by hand."""

from api.openai_metrics import estimated_finish, event_data, event_message, prefixed


def test_every_number_keeps_its_name_behind_the_split():
    values = {"step": 4, "loss": 0.5, "accuracy": 1, "phase": "sft", "ok": True, "lengths": [1, 2]}
    assert prefixed(values, "train") == {"train_loss": 0.5, "train_accuracy": 1.0}
    assert prefixed({"reward_mean": 0.2}, "validation") == {"valid_reward_mean": 0.2}


def test_a_training_step_in_openai_s_layout():
    step = {
        "split": "train",
        "total_steps": 10,
        "step": 2,
        "loss": 0.25,
        "reward_mean": 0.5,
        "reward/exact": 0.75,
        "response_length": 12.0,
        "rollout_time_s": 3.0,
        "step_time_s": 5.0,
    }
    assert event_data(step) == {
        "step": 2,
        "total_steps": 10,
        "train_loss": 0.25,
        "train_mean_reward": 0.5,
        "train_reward_mean": 0.5,
        "train_reward/exact": 0.75,
        "train_response_length": 12.0,
        "train_rollout_time_s": 3.0,
        "train_step_time_s": 5.0,
        "scores": {"train_reward_mean": 0.5, "graders": [{"name": "exact", "train_reward_mean": 0.75}]},
        "completion_tokens_mean": 12.0,
        "timing": {"step": {"sampling": 3.0, "full_iteration": 5.0}},
    }
    assert event_message(step) == "Step 2/10: training loss=0.25, train mean reward=0.50"


def test_an_evaluation_in_openai_s_layout():
    evaluation = {"split": "validation", "total_steps": 10, "step": 10, "reward_mean": 0.4, "accuracy": 0.4}
    data = event_data(evaluation)
    assert data["full_valid_mean_reward"] == 0.4 and data["valid_accuracy"] == 0.4
    assert data["scores"] == {"valid_reward_mean": 0.4, "graders": []}
    assert "timing" not in data and "train_mean_reward" not in data
    assert event_message(evaluation) == (
        "Step 10/10: full validation mean reward=0.40, full validation accuracy=0.40"
    )


def test_a_supervised_step_has_no_reward_keys():
    data = event_data({"split": "train", "total_steps": 3, "step": 1, "loss": 2.0})
    assert data == {"step": 1, "total_steps": 3, "train_loss": 2.0}
    assert event_message({"split": "train", "total_steps": 3, "step": 1, "loss": 2.0}) == (
        "Step 1/3: training loss=2.00"
    )


def test_estimated_finish_carries_the_recent_pace_over_the_steps_left():
    # Steps 4 and 8 ended 100 s apart: 25 s a step, and 12 of 20 steps are left after step 8.
    assert estimated_finish([(4, 1000.0), (6, 1040.0), (8, 1100.0)], total_steps=20) == 1100 + 12 * 25
    assert estimated_finish([(19, 500.0), (20, 510.0)], total_steps=20) == 510  # the last step ended
    assert estimated_finish([(3, 500.0)], total_steps=20) is None  # one step gives no pace yet
    assert estimated_finish([], total_steps=20) is None
