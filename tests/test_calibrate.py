"""benchmarks/calibrate.py's fit: the scale factors it finds make 'auto' pick the measured best."""
from benchmarks import calibrate


def _row(pass_, times, raw):
    return {"pass": pass_, "times": times, "raw": raw}


def test_fit_rescales_a_model_that_is_off_by_a_constant_factor():
    # the models of 'gemm' and 'winograd' say 10x and 0.1x their real time; direct's is right
    rows = []
    for t in (1.0, 2.0, 4.0, 8.0):
        times = {"direct": t, "im2col": 0.8 * t, "gemm": 0.5 * t, "winograd": 1.5 * t, "fft": 3 * t}
        raw = {"direct": t, "im2col": 0.8 * t, "gemm": 5.0 * t, "winograd": 0.15 * t, "fft": 3 * t}
        for pass_ in ("forward", "grad_input", "grad_weight"):
            rows.append(_row(pass_, dict(times), dict(raw)))
    coef = calibrate.fit(rows)
    for r in rows:
        assert calibrate.pick(r, coef) == "gemm"
    assert set(coef) == {f"{n}/{p}" for n in ("im2col", "gemm", "winograd", "fft")
                         for p in ("forward", "grad_input", "grad_weight")}


def test_fit_keeps_factors_at_one_when_the_models_already_rank_right():
    rows = [_row("forward", {"direct": 1.0, "im2col": 2.0}, {"direct": 1.0, "im2col": 2.0}),
            _row("forward", {"direct": 3.0, "im2col": 1.0}, {"direct": 3.0, "im2col": 1.0})]
    coef = calibrate.fit(rows)
    assert coef["im2col/forward"] == [1.0, 0.0]


def test_fit_weights_the_public_suite_over_the_other_cases():
    # one suite shape and one training layer that no single factor can serve both: the suite's
    # pick needs im2col's factor below 0.75, the other's above 1; each lost pick costs 1.5x
    training = calibrate.TRAINING[0].name
    suite = {"case": "resnet50-3x3-64", "pass": "forward", "times": {"direct": 1.5, "im2col": 1.0},
             "raw": {"direct": 1.5, "im2col": 2.0}}
    other = {"case": training, "pass": "forward", "times": {"direct": 1.0, "im2col": 1.5},
             "raw": {"direct": 1.0, "im2col": 1.0}}
    coef = calibrate.fit([suite, other])
    assert calibrate.pick(suite, coef) == "im2col"
    assert calibrate._weight(suite) == calibrate.SUITE_WEIGHT > calibrate._weight(other) == 1.0
    assert calibrate._weight({"case": "resnet50-3x3-64@n1"}) == 1.0
