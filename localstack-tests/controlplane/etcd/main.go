// etcd's own main lives in a module with replace directives, which `go build`
// cannot take as a dependency; this calls the same entry point.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
