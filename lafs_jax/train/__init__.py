"""Training tasks shared by every method: the one loop, the teacher-student and margin-softmax steps, optimizers, checkpoints."""
