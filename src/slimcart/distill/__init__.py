"""Knowledge distillation: a smaller student learns from the current model (the teacher).

``losses``: the loss terms, as plain functions; ``students``: builders that make a student from
the teacher's architecture spec; ``teacher``: the teacher's outputs, computed once and cached;
``technique``: the ``distill`` recipe stage that ties them to the trainer."""
