"""The ordered list of build stages: the one place that says what `stacklab build` runs."""

from stacklab.data.build import DATA_STAGES
from stacklab.evals.stage import EVAL_STAGE
from stacklab.pipeline import Stage
from stacklab.rl.trainer import RL_STAGE
from stacklab.train.pretrain import PRETRAIN_STAGE
from stacklab.train.sft import SFT_STAGE

STAGES: list[Stage] = [*DATA_STAGES, PRETRAIN_STAGE, SFT_STAGE, RL_STAGE, EVAL_STAGE]
