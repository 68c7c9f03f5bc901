"""The results CSV of a finished job (service/results.py), checked by hand."""

from service.results import results_csv


def test_openai_s_columns_first_then_ours_with_empty_cells_where_a_number_is_missing():
    train = {1: {"loss": 0.5, "reward_mean": 0.25, "trained_tokens": 120, "phase": "rft"}, 2: {"loss": 0.125}}
    evals = {0: {"reward_mean": 0.1, "accuracy": 0.1}, 2: {"reward_mean": 0.5, "accuracy": 0.5}}
    assert results_csv(train, evals).splitlines() == [
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy,"
        "train_mean_reward,valid_mean_reward,valid_accuracy,trained_tokens",
        "0,,,,,,0.1,0.1,",
        "1,0.5,,,,0.25,,,120",
        "2,0.125,,,,,0.5,0.5,",
    ]


def test_a_job_without_metrics_has_the_header_only():
    assert results_csv({}, {}).count("\n") == 1
