"""The pruning engine: which units exist, how important each is, how many go, and when.

Data flows one way through these modules:

    groups.py     the units of a decoder layer (a KV group or a query head; an FFN channel) and
                  how their rows and columns sum into one score per unit
    scorers/      one class per criterion, built once from the config: after each step's
                  backward pass it returns this step's score of every unit (base.py is the contract)
    scores.py     the moving average of those scores over steps (paper Eq. 12)
    target.py     whole-model sparsity → units removed per layer
    schedule.py   the cubic ramp: what share of the target is removed after each step
    selection.py  lowest-scored units of the kept ones are dropped, never given back
    masks.py      keep-masks per layer and the forward hooks that zero masked units' outputs

The training recipe (loraprune.training.recipe) calls them in that order every step.
"""
