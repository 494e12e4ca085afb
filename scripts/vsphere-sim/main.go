// A vSphere API simulator for vmrepo's tests: govmomi's simulator library (Debian's
// golang-github-vmware-govmomi-dev) serving HTTPS on loopback with a given certificate, user
// and password. Built and started by scripts/vsphere-sim.sh.
//
// The library does not implement QueryChangedDiskAreas (changed-block tracking). With -cbt
// DIR, this wrapper answers it from DIR/VMNAME.json, which a test writes:
//
//	{"capacity": BYTES, "since": {"CHANGEID": [[START, LENGTH], ...], "*": [...]}}
//
// The answer is a DiskChangeInfo as the API reference defines it (startOffset, length, and
// changedArea start/length), covering from the asked offset to the end in one answer. A
// change id the file does not list is answered with the fault a host gives for an unknown
// one (InvalidArgument on changeId), as after a CBT reset.
package main

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

type cbtFile struct {
	Capacity int64                 `json:"capacity"`
	Since    map[string][][2]int64 `json:"since"`
}

var (
	reThis   = regexp.MustCompile(`<_this[^>]*>([^<]+)</_this>`)
	reChange = regexp.MustCompile(`<changeId>([^<]*)</changeId>`)
	reStart  = regexp.MustCompile(`<startOffset>(\d+)</startOffset>`)
)

const envelope = `<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope ` +
	`xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" ` +
	`xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>%s</soapenv:Body></soapenv:Envelope>`

// changedAreas answers one QueryChangedDiskAreas request body from dir.
func changedAreas(dir string, body []byte, w http.ResponseWriter) {
	fault := func(msg string) {
		w.Header().Set("Content-Type", "text/xml")
		w.WriteHeader(500)
		fmt.Fprintf(w, envelope, `<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>`+
			msg+`</faultstring><detail><InvalidArgumentFault xmlns="urn:vim25" `+
			`xsi:type="InvalidArgument"><invalidProperty>changeId</invalidProperty>`+
			`</InvalidArgumentFault></detail></soapenv:Fault>`)
	}
	this, change, start := reThis.FindSubmatch(body), reChange.FindSubmatch(body), reStart.FindSubmatch(body)
	if this == nil || change == nil || start == nil {
		fault("A specified parameter was not correct: ")
		return
	}
	vm, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: string(this[1])}).(*simulator.VirtualMachine)
	if !ok {
		fault("The object has already been deleted or has not been completely created")
		return
	}
	var f cbtFile
	text, err := os.ReadFile(filepath.Join(dir, vm.Name+".json"))
	if err == nil {
		err = json.Unmarshal(text, &f)
	}
	areas, known := f.Since[string(change[1])]
	if err != nil || !known {
		fault("A specified parameter was not correct: changeId")
		return
	}
	from, _ := strconv.ParseInt(string(start[1]), 10, 64)
	var b bytes.Buffer
	fmt.Fprintf(&b, `<QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval>`+
		`<startOffset>%d</startOffset><length>%d</length>`, from, f.Capacity-from)
	for _, a := range areas {
		if a[0]+a[1] > from {
			fmt.Fprintf(&b, `<changedArea><start>%d</start><length>%d</length></changedArea>`, a[0], a[1])
		}
	}
	b.WriteString(`</returnval></QueryChangedDiskAreasResponse>`)
	w.Header().Set("Content-Type", "text/xml")
	fmt.Fprintf(w, envelope, b.String())
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on")
	certFile := flag.String("cert", "", "TLS certificate (PEM)")
	keyFile := flag.String("key", "", "TLS key (PEM)")
	user := flag.String("user", "root", "login user")
	pass := flag.String("pass", "", "login password")
	mode := flag.String("mode", "esx", "esx (a standalone host) or vpx (vCenter)")
	vms := flag.Int("vms", 2, "VMs per resource pool")
	cbt := flag.String("cbt", "", "answer QueryChangedDiskAreas from DIR/VMNAME.json")
	datastores := flag.Int("ds", 2, "datastores (LocalDS_0, LocalDS_1, ...; the VMs are on the first)")
	flag.Parse()

	var m *simulator.Model
	switch *mode {
	case "esx":
		m = simulator.ESX()
	case "vpx":
		m = simulator.VPX()
		m.Cluster = 0
		m.Host = 1
	default:
		log.Fatalf("unknown -mode %q", *mode)
	}
	m.Machine = *vms
	m.Datastore = *datastores
	if err := m.Create(); err != nil {
		log.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatal(err)
	}
	m.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	m.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *pass)}
	s := m.Service.NewServer()
	if *cbt != "" {
		// Set before the address is printed, so before any client can connect.
		next := s.Config.Handler
		s.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodPost && r.URL.Path == "/sdk" {
				body, _ := io.ReadAll(r.Body)
				if bytes.Contains(body, []byte("<QueryChangedDiskAreas")) {
					changedAreas(*cbt, body, w)
					return
				}
				r.Body = io.NopCloser(bytes.NewReader(body))
			}
			next.ServeHTTP(w, r)
		})
	}
	fmt.Printf("VSIM_ADDR=%s\n", s.URL.Host)
	os.Stdout.Sync()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
	s.Close()
	m.Remove()
}
