"""Pure loss math: functions of tensors that return tensors. This package imports torch and nothing else.

Each method's loss lives in its own module here (added with the method), next to the shared pieces every method
uses: masked aggregation, the KL estimator vocabulary and sequence log-prob sums.
"""
