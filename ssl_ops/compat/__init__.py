"""Import swaps for code written against other SSL libraries:

* ``ssl_ops.compat.lightly``: lightly's names and signatures (and ``patch()``
  for scripts that cannot be edited);
* ``ssl_ops.compat.solo_learn``: solo-learn's loss functions.

Neither imports the library it replaces, except ``lightly.patch()``, which
needs lightly installed.
"""
