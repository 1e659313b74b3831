"""parallel.overlap_param_gather: the distributed optimizer's step leaves each rank's parameter
all-gather to the next forward's hooks, so right after a step the model parameters are only partly
current. A checkpoint written then (no forward in between: evaluation off) must still hold that
step's weights: the trainer gathers them before it saves. Compared with the same training whose step
all-gathers itself, at DP=2 on forked gloo ranks, by the logits of the checkpoints loaded on one rank.
"""
from __future__ import annotations

import numpy as np

from tests.convert.convert_helpers import make_checkpoint, outputs_at

COMMON = ["--train.eval_iters=0", "--parallel.bucket_size=20000"]


def test_a_checkpoint_written_right_after_the_step_holds_its_weights(tmp_path):
    gathered_in_step = make_checkpoint(tmp_path / "step", *COMMON, world_size=2, iters=3, dp_opt=True)
    left_to_forward = make_checkpoint(tmp_path / "overlap", *COMMON, "--parallel.overlap_param_gather=true",
                                      world_size=2, iters=3, dp_opt=True)
    want, got = outputs_at(gathered_in_step), outputs_at(left_to_forward)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
