// Package health checks Switchboard's objects, read back from a real API server, with the health
// rules of the two GitOps tools: Flux's kstatus (sigs.k8s.io/cli-utils/pkg/kstatus/status, what
// Flux's health checks run) and Argo CD's Lua health checks shipped in
// charts/switchboard/files/argocd, run by gopher-lua as Argo CD runs them (the object as the
// global `obj`, the chunk's returned table as {status, message}).
//
// tests/kubernetes_e2e.rs runs it with the objects in a namespace and says what each must show:
//
//	SWITCHBOARD_HEALTH_KUBECONFIG  kubeconfig of the cluster
//	SWITCHBOARD_HEALTH_NAMESPACE   namespace of the objects
//	SWITCHBOARD_HEALTH_LUA         folder of the Lua checks (switchboard.dev_KIND.lua)
//	SWITCHBOARD_HEALTH_DEFAULT     KSTATUS/ARGOCD every object must have, e.g. Current/Healthy
//	SWITCHBOARD_HEALTH_EXPECT      exceptions: NAME=KSTATUS/ARGOCD,...
//
// Without SWITCHBOARD_HEALTH_KUBECONFIG it is skipped (there is nothing to read).
package health

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	lua "github.com/yuin/gopher-lua"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

var kinds = map[string]string{"Trunk": "trunks", "PhoneNumber": "phonenumbers", "RoutingRule": "routingrules"}

// argoHealth runs one Argo CD health script over obj and returns (status, message).
func argoHealth(script string, obj map[string]interface{}) (string, string, error) {
	L := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer L.Close()
	// The libraries Argo CD opens for health scripts.
	for _, lib := range []struct {
		name string
		fn   lua.LGFunction
	}{{lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}, {lua.StringLibName, lua.OpenString}, {lua.MathLibName, lua.OpenMath}} {
		L.Push(L.NewFunction(lib.fn))
		L.Push(lua.LString(lib.name))
		L.Call(1, 0)
	}
	L.SetGlobal("obj", toLua(L, obj))
	if err := L.DoString(script); err != nil {
		return "", "", err
	}
	table, ok := L.Get(-1).(*lua.LTable)
	if !ok {
		return "", "", fmt.Errorf("the script returned %s, not a table", L.Get(-1).Type())
	}
	return lua.LVAsString(table.RawGetString("status")), lua.LVAsString(table.RawGetString("message")), nil
}

// toLua converts decoded JSON as Argo CD does: objects to tables with string keys, arrays to
// 1-based sequences, numbers to LNumber.
func toLua(L *lua.LState, value interface{}) lua.LValue {
	switch v := value.(type) {
	case map[string]interface{}:
		t := L.NewTable()
		for key, item := range v {
			t.RawSetString(key, toLua(L, item))
		}
		return t
	case []interface{}:
		t := L.NewTable()
		for _, item := range v {
			t.Append(toLua(L, item))
		}
		return t
	case string:
		return lua.LString(v)
	case bool:
		return lua.LBool(v)
	case int64:
		return lua.LNumber(v)
	case float64:
		return lua.LNumber(v)
	case nil:
		return lua.LNil
	default:
		return lua.LString(fmt.Sprint(v))
	}
}

// readyMessage is the message of the object's Ready condition ("" when there is none).
func readyMessage(obj map[string]interface{}) string {
	conditions, _, _ := unstructured.NestedSlice(obj, "status", "conditions")
	for _, c := range conditions {
		if m, ok := c.(map[string]interface{}); ok && m["type"] == "Ready" {
			s, _ := m["message"].(string)
			return s
		}
	}
	return ""
}

func TestHealth(t *testing.T) {
	kubeconfig := os.Getenv("SWITCHBOARD_HEALTH_KUBECONFIG")
	if kubeconfig == "" {
		t.Skip("SWITCHBOARD_HEALTH_KUBECONFIG is not set: tests/kubernetes_e2e.rs runs this against a cluster")
	}
	namespace := os.Getenv("SWITCHBOARD_HEALTH_NAMESPACE")
	defaultWant := os.Getenv("SWITCHBOARD_HEALTH_DEFAULT")
	expect := map[string]string{}
	for _, item := range strings.Split(os.Getenv("SWITCHBOARD_HEALTH_EXPECT"), ",") {
		if name, want, ok := strings.Cut(item, "="); ok {
			expect[name] = want
		}
	}
	config, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	client, err := dynamic.NewForConfig(config)
	if err != nil {
		t.Fatal(err)
	}
	seen := 0
	for kind, plural := range kinds {
		script, err := os.ReadFile(filepath.Join(os.Getenv("SWITCHBOARD_HEALTH_LUA"), "switchboard.dev_"+kind+".lua"))
		if err != nil {
			t.Fatalf("the Argo CD health check of %s: %v", kind, err)
		}
		gvr := schema.GroupVersionResource{Group: "switchboard.dev", Version: "v1alpha1", Resource: plural}
		list, err := client.Resource(gvr).Namespace(namespace).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for i := range list.Items {
			obj := &list.Items[i]
			seen++
			want := defaultWant
			if w, ok := expect[obj.GetName()]; ok {
				want = w
			}
			wantKstatus, wantArgo, _ := strings.Cut(want, "/")
			result, err := status.Compute(obj)
			if err != nil {
				t.Fatalf("%s/%s: kstatus: %v", kind, obj.GetName(), err)
			}
			argo, message, err := argoHealth(string(script), obj.Object)
			if err != nil {
				t.Fatalf("%s/%s: Argo CD health script: %v", kind, obj.GetName(), err)
			}
			t.Logf("%s/%s (generation %d): kstatus %s (%q), Argo CD %s (%q)", kind, obj.GetName(), obj.GetGeneration(), result.Status, result.Message, argo, message)
			if string(result.Status) != wantKstatus {
				t.Errorf("%s/%s: kstatus says %s, want %s", kind, obj.GetName(), result.Status, wantKstatus)
			}
			if argo != wantArgo {
				t.Errorf("%s/%s: Argo CD says %s, want %s", kind, obj.GetName(), argo, wantArgo)
			}
			if argo != "Progressing" && message != readyMessage(obj.Object) {
				t.Errorf("%s/%s: Argo CD's message %q is not the Ready condition's %q", kind, obj.GetName(), message, readyMessage(obj.Object))
			}
		}
	}
	if seen == 0 {
		t.Fatalf("no Switchboard objects in namespace %q", namespace)
	}
}
