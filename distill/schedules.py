"""Re-export of ``lrm.schedules`` (the one schedule module) for the modules that still import it from here."""

from lrm.schedules import BETA_SCHEDULES, DDPMSchedule, FlowSchedule, _as_timesteps, broadcast, schedule_from_dict

__all__ = ["BETA_SCHEDULES", "DDPMSchedule", "FlowSchedule", "_as_timesteps", "broadcast", "schedule_from_dict"]
