"""The in-app (mobile) SDK channel: SDK endpoints, devices and push (FCM, APNs)."""
