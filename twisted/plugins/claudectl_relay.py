from twisted.application.service import ServiceMaker

claudectlRelay = ServiceMaker(
    "claudectl relay",
    "claudectl.relay.tap",
    "The claudectl relay & hive mind: authenticated peer links, knowledge gossip, "
    "remote task delegation.",
    "claudectl-relay",
)
