"""fusetune's Hydra launcher (Hydra takes launchers only from the hydra_plugins package).

``hydra/launcher=local`` (conf/hydra/launcher/local.yaml) names ``JoblibLauncher`` here. Hydra imports this module
in every Hydra app, so it imports fusetune only when a sweep launches.
"""

from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher as HydraJoblibLauncher


class JoblibLauncher(HydraJoblibLauncher):
    """Hydra's joblib launcher (the same keys), and a job whose worker process dies fails alone: the others run
    on (fusetune.app.launcher)."""

    def launch(self, job_overrides, initial_job_idx):
        from fusetune.app.launcher import launch

        return launch(self, job_overrides, initial_job_idx)
