"""The ordered list of build stages: the one place that says what `stacklab build` runs."""

from stacklab.data.build import DATA_STAGES
from stacklab.pipeline import Stage

STAGES: list[Stage] = [*DATA_STAGES]
