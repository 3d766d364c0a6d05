from twisted.application.service import ServiceMaker

claudectlRelay = ServiceMaker(
    "claudectl relay",
    "claudectl.service.compose",
    "The claudectl relay & hive mind: authenticated peer links, knowledge gossip, "
    "remote task delegation.",
    "claudectl-relay",
)
