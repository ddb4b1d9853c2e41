"""Training levers for DeRS models: data-driven router initialisation and per-group learning rates."""

from .optim import GROUP_HELP, GROUPS, check_param_groups, create_optimizer, group_of_params, param_groups
from .router_init import init_routers_kmeans, spherical_kmeans

__all__ = [
    "GROUPS",
    "GROUP_HELP",
    "check_param_groups",
    "create_optimizer",
    "group_of_params",
    "init_routers_kmeans",
    "param_groups",
    "spherical_kmeans",
]
