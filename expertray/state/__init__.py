"""What the controller and routers know about the cluster, Ray-free: the versioned placement table, the
topology and Ray's nodes as placement sees them, load statistics, and the names actors are registered under."""
