"""Online RL's parts: the batched rollout engine, the rollout batch source and credit assignment,
rewards, step verifiers, final answers, user plugins and the arithmetic tasks."""
