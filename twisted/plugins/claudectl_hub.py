from twisted.application.service import ServiceMaker

claudectlHub = ServiceMaker(
    "claudectl hub",
    "claudectl.hub.tap",
    "A claudectl NAT hub: splices peer links it cannot read.",
    "claudectl-hub",
)
