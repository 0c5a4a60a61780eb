"""Method `plain`: the same sampler and seeds as MGD³, no guidance (the fair baseline)."""

from __future__ import annotations

from mgd3.methods import METHODS, Batch, Method


@METHODS.register("plain")
class Plain(Method):
    name = "plain"

    def generate(self, ctx, items):
        return Batch(ctx.sample(items), mode_ids=[None] * len(items))
