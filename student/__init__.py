"""Stage 5: distil the whole ensemble (generalist + specialists, combined per example) into one student.

``python -m student.train`` (or ``specdistill student``) runs :func:`student.train.run_student`;
``student.cache`` keeps teacher targets computed once per training example, ``student.teachers``
says who teaches (ensemble, generalist, or an average of generalists), and the losses live in
``specdistill.kd``.
"""
