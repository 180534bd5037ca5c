-- Argo CD health check of switchboard.dev/RoutingRule (resource.customizations.health.switchboard.dev_RoutingRule).
-- Healthy when the operator observed the current generation and Ready is True; Degraded when it
-- refused the spec or a reference is missing (Ready False); Progressing until then, or while the
-- operator cannot write to its database (the change is retried). The message is the condition's.
local hs = { status = "Progressing", message = "Waiting for the Switchboard operator to reconcile this RoutingRule" }
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= obj.metadata.generation then
  hs.message = "Waiting for the Switchboard operator to observe generation " .. tostring(obj.metadata.generation)
  return hs
end
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "Ready" then
    hs.message = condition.message
    if condition.status == "True" then
      hs.status = "Healthy"
    elseif condition.status == "False" and condition.reason ~= "DatabaseUnavailable" then
      hs.status = "Degraded"
    end
    return hs
  end
end
return hs
