//go:build tools

// Pins the containerd commands the local environment's Nodes run, so
// `go mod tidy` keeps them: the daemon, its runc shim and ctr (images are
// imported with it).
package containerd

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
