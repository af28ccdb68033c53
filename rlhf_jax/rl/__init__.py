"""Online RL: the loop (:mod:`.loop`), the algorithms as presets (:mod:`.algorithms`), the objective
(:mod:`.objective`), the jitted score and update steps (:mod:`.steps`), policy-gradient methods
(:mod:`.policy_gradient`) and online DPO (:mod:`.online_dpo`)."""
