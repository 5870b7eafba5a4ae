"""Self-play iterations: generate with π_t → judge → build pairs → train RSPO or SPIN → π_{t+1}, resumable."""

from llmreg.selfplay.judges import PairwiseJudge, RewardFunctionJudge, RewardModelJudge, make_judge
from llmreg.selfplay.loop import SelfPlayArguments, SelfPlayLoop, run_selfplay


__all__ = ["PairwiseJudge", "RewardFunctionJudge", "RewardModelJudge", "SelfPlayArguments", "SelfPlayLoop",
           "make_judge", "run_selfplay"]
