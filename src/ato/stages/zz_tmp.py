from ato.stages import stats  # noqa
